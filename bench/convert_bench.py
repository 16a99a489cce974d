"""Conversion benchmark: a random-init Llama 3.1 8B (bf16, ~16 GB) to Megatron-Core TP4 x PP2 and back.

    .venv/bin/python bench/convert_bench.py --workdir /tmp/convert-bench --json bench-convert.json [--repeat 3]

Makes the HF directory by streaming random tensors through HFCheckpointWriter (never the whole
model in memory), times `cp -r` of it as the I/O baseline, then runs `llamatron convert hf-to-mcore`
and `mcore-to-hf` as child processes, recording each one's wall time, peak RSS (the kernel's
high-water mark VmHWM, which counts memory-mapped file pages touched) and peak anonymous memory (sampled).
With --repeat N, `cp -r` of the HF directory and mcore-to-hf run N times, alternating, so both see
the same load on a shared machine; `cp -r` of the Megatron directory (mcore-to-hf's input) is timed
each round too. Checks that the round trip is bit-identical (a sample of tensors, or all with
--check-all), writes JSON with the 1-minute load average around each step, and deletes everything
it made. Disk: about three times the model (HF, Megatron-Core and the converted copy at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def make_random_hf(out: Path, *, preset_name: str, seed: int, num_layers: int | None = None) -> None:
    from llamatron.checkpoint.hf import HFCheckpointWriter, expected_hf_shapes
    from llamatron.model import preset

    config = preset(preset_name)
    if num_layers is not None:  # a smaller proxy with the same tensor shapes
        config = config.replace(num_layers=num_layers)
    generator = torch.Generator().manual_seed(seed)
    # With the Llama 3 tokenizer files, as Meta's directories have them (conversions carry them along).
    with HFCheckpointWriter(out, config=config, dtype=torch.bfloat16, tokenizer="llama3") as writer:
        for name, shape in expected_hf_shapes(config).items():
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            tensor.normal_(0.0, 0.02, generator=generator)
            writer.write(name, tensor)


def _sample_anon(pid: int, peak: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak["anon_kib"] = max(peak.get("anon_kib", 0), int(line.split()[1]))
                elif line.startswith("VmHWM:"):  # the kernel's own peak RSS of this process image
                    peak["hwm_kib"] = max(peak.get("hwm_kib", 0), int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.1)


def run_measured(cmd: list[str]) -> dict[str, float]:
    """Wall time, peak RSS (VmHWM, sampled every 0.1 s until exit) and peak RssAnon (sampled).
    ru_maxrss is not used: a child forked from this (large) process inherits its high-water mark."""
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak.get("hwm_kib", 0) / 2**20, 2),
            "peak_anon_gib": round(peak.get("anon_kib", 0) / 2**20, 2),
            "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def has_room(path: Path, nbytes: int, *, margin: int = 2 * 2**30) -> bool:
    """Whether the (shared) disk holds `nbytes` more and still leaves `margin` for everyone else."""
    return shutil.disk_usage(path).free >= nbytes + margin


def need_room(path: Path, nbytes: int, *, what: str) -> None:
    if not has_room(path, nbytes):
        free = shutil.disk_usage(path).free
        raise SystemExit(f"not enough disk for {what}: {nbytes / 1e9:.1f} GB + 2 GiB margin needed, "
                         f"{free / 1e9:.1f} GB free in {path}")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def spot_check(a: Path, b: Path, *, check_all: bool = False) -> list[str]:
    """Bit-identical round trip for a sample of tensors (first/last layer, embedding, output layer),
    or for every tensor."""
    from llamatron.checkpoint.hf import HFCheckpointReader

    left, right = HFCheckpointReader(a), HFCheckpointReader(b)
    assert sorted(left.names()) == sorted(right.names())
    last = left.config.num_layers - 1
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             *(f"model.layers.{i}.{p}" for i in (0, last) for p in (
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight"))]
    names = left.names() if check_all else [n for n in names if n in left]  # tied: no lm_head.weight
    for name in names:
        if not torch.equal(left.get(name), right.get(name)):
            raise SystemExit(f"round trip changed {name}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llamatron-convert-bench"))
    parser.add_argument("--json", type=Path, default=Path("bench-convert.json"))
    parser.add_argument("--preset", default="llama3.1-8b")
    parser.add_argument("--num-layers", type=int, default=None, help="Fewer layers than the preset (a quick proxy).")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="Rounds of cp -r and mcore-to-hf (alternating).")
    parser.add_argument("--check-all", action="store_true", help="Compare every tensor, not a sample.")
    parser.add_argument("--keep", action="store_true", help="Keep the directories (default: delete them).")
    args = parser.parse_args()

    work = args.workdir
    if work.exists():
        raise SystemExit(f"{work} exists; remove it or pass another --workdir")
    work.mkdir(parents=True)
    hf, copy, mcore_dir, back = work / "hf", work / "hf-copy", work / "mcore", work / "hf-back"
    cli = [sys.executable, "-m", "llamatron.cli.main", "convert"]
    result: dict[str, object] = {"preset": args.preset, "num_layers": args.num_layers, "tp": args.tp, "pp": args.pp, "host": platform.node(),
                                 "cpus": os.cpu_count(), "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        start = time.monotonic()
        make_random_hf(hf, preset_name=args.preset, seed=0, num_layers=args.num_layers)
        result["make_hf_s"] = round(time.monotonic() - start, 1)
        result["hf_bytes"] = dir_bytes(hf)
        need_room(work, result["hf_bytes"], what="cp -r of the HF directory")
        result["cp_r"] = run_measured(["cp", "-r", str(hf), str(copy)])
        shutil.rmtree(copy)
        need_room(work, result["hf_bytes"], what="hf-to-mcore")
        result["hf_to_mcore"] = run_measured([*cli, "hf-to-mcore", "--hf", str(hf), "--out", str(mcore_dir),
                                              "--tp", str(args.tp), "--pp", str(args.pp)])
        result["mcore_bytes"] = dir_bytes(mcore_dir)
        cp_s = result["cp_r"]["wall_s"]
        result["ratio_hf_to_mcore_vs_cp"] = round(result["hf_to_mcore"]["wall_s"] / cp_s, 2)
        rounds = []
        for i in range(args.repeat):
            # The first round uses the cp -r timed above; later ones time it again next to mcore-to-hf.
            need_room(work, result["hf_bytes"], what="cp -r and mcore-to-hf")
            cp_hf = result["cp_r"] if i == 0 else run_measured(["cp", "-r", str(hf), str(copy)])
            shutil.rmtree(copy, ignore_errors=True)
            cp_mcore = None  # optional: skipped when the shared disk is short
            if has_room(work, result["mcore_bytes"]):
                cp_mcore = run_measured(["cp", "-r", str(mcore_dir), str(copy)])
                shutil.rmtree(copy)
            need_room(work, result["hf_bytes"], what="mcore-to-hf")
            to_hf = run_measured([*cli, "mcore-to-hf", "--mcore", str(mcore_dir), "--out", str(back)])
            if i == args.repeat - 1:
                result["checked_tensors"] = len(spot_check(hf, back, check_all=args.check_all))
            if i < args.repeat - 1:
                shutil.rmtree(back)
            rounds.append({"cp_r": cp_hf, "cp_r_mcore": cp_mcore, "mcore_to_hf": to_hf,
                           "ratio_vs_cp": round(to_hf["wall_s"] / cp_hf["wall_s"], 2),
                           "ratio_vs_cp_mcore": round(to_hf["wall_s"] / cp_mcore["wall_s"], 2) if cp_mcore else None})
            print(json.dumps(rounds[-1]), flush=True)
        result["mcore_to_hf"] = rounds[0]["mcore_to_hf"]
        result["ratio_mcore_to_hf_vs_cp"] = rounds[0]["ratio_vs_cp"]
        result["mcore_to_hf_rounds"] = rounds
        ratios = [r["ratio_vs_cp"] for r in rounds]
        result["ratio_mcore_to_hf_vs_cp_range"] = [min(ratios), max(ratios)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
