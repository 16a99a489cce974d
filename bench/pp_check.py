"""Pipeline parallelism on GPUs with NCCL: the trainer's losses under pipeline layouts against one GPU,
and what each layout costs (tokens/s per GPU, step time, peak memory).

The CPU tests (tests/distributed/test_pp.py) run the same comparison on gloo with the tiny model; this
runs `llamatron train` (the real CLI, torchrun inside) on one random corpus under each layout, reads
every run's metrics.jsonl and prints a table, with the largest relative loss difference to the
single-process run, and writes it all as JSON. Layouts take all the GPUs they name (nproc); a layout
needing more GPUs than there are is skipped. The single-GPU reference must fit one GPU (fp32 master
weights and Adam: 16 bytes per parameter, so 1B or 3B, not 8B; for 8B compare pipeline layouts with
each other, e.g. --layouts tp2-pp2-sp,tp4-pp2-sp).

    python bench/pp_check.py --out pp_check.json                    # 1B (tied), bf16, on 2 or 4 GPUs
    python bench/pp_check.py --model llama3.1-8b --seq-len 4096 --layouts single,pp2,tp2-pp2-sp --out 8b.json
    python bench/pp_check.py --precision fp32 --out pp_fp32.json    # fp32 (TF32 off): losses ~1e-5 apart
    python bench/pp_check.py --device cpu --model tiny-2k --seq-len 32 --iters 3 \\
        --layouts single,pp2,pp2-vp2 --out /tmp/pp_check.json   # the logic at tiny scale on CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llamatron.data.indexed import write_documents  # noqa: E402
from llamatron.model import preset  # noqa: E402

# name -> (flags, processes). Global batch 8 in micro-batches of 1 gives every pipeline >= 2 micro-batches.
LAYOUTS: dict[str, tuple[tuple[str, ...], int]] = {
    "single": ((), 1),
    "pp2": (("--parallel.pp=2",), 2),
    "pp2-vp2": (("--parallel.pp=2", "--parallel.virtual_pipeline=2"), 2),
    "tp2-pp2-sp": (("--parallel.pp=2", "--parallel.tp=2", "--parallel.sequence_parallel=true"), 4),
    "dp2-pp2": (("--parallel.pp=2",), 4),
    "pp4": (("--parallel.pp=4",), 4),
    "tp4-pp2-sp": (("--parallel.pp=2", "--parallel.tp=4", "--parallel.sequence_parallel=true"), 8),
}


def _corpus(path: Path, *, vocab: int, eod: int) -> Path:
    rng = np.random.default_rng(0)
    docs = [[*rng.integers(0, min(vocab - 2, 128000), size=int(rng.integers(200, 4000))).tolist(), eod]
            for _ in range(600)]
    prefix = path / "corpus_text_document"
    write_documents(prefix, docs, dtype=np.int32)
    return prefix


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _run(name: str, args, *, corpus: Path, work: Path) -> dict:
    flags, nproc = LAYOUTS[name]
    out = work / name
    cmd = [
        sys.executable, "-m", "llamatron.cli.main", "train", "--output", str(out), f"--data.data_path={corpus}",
        f"--model.name={args.model}", f"--training.seq_len={args.seq_len}", f"--training.precision={args.precision}",
        "--training.micro_batch_size=1", f"--training.global_batch_size={args.global_batch}",
        f"--train-iters={args.iters}", "--training.eval_interval=0", "--checkpoint.save_at_end=false",
        "--checkpoint.save_interval=100000", "--logging.tensorboard=false", f"--training.device={args.device}",
        "--optim.lr=1e-4", "--optim.min_lr=1e-5", *flags,
    ]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if args.precision == "fp32":
        env["NVIDIA_TF32_OVERRIDE"] = "0"  # fp32 matmuls, so layouts differ only by summation order
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"layout": name, "error": proc.stderr[-3000:]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[len(records) // 2:]  # past the first steps (allocator warm-up, schedule set-up)
    peaks = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
    return {
        "layout": name, "processes": nproc, "flags": list(flags),
        "losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
        "tokens_per_s_per_gpu": float(np.mean([r["tokens_per_s_per_gpu"] for r in steady])),
        "step_time_s": float(np.mean([r["step_time_s"] for r in steady])),
        "mfu": float(np.mean([r["mfu"] for r in steady])) if all(r.get("mfu") is not None for r in steady) else None,
        "peak_memory_gib": max(peaks) if peaks else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--layouts", default="single,pp2,pp2-vp2,tp2-pp2-sp,dp2-pp2,pp4,tp4-pp2-sp")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", default="pp_check.json")
    args = parser.parse_args()

    available = _gpus() if args.device == "cuda" else 8
    config = preset(args.model)
    names = [n for n in args.layouts.split(",") if LAYOUTS[n][1] <= available]
    skipped = [n for n in args.layouts.split(",") if n not in names]
    with tempfile.TemporaryDirectory(prefix="pp_check_") as tmp:
        corpus = _corpus(Path(tmp), vocab=config.vocab_size, eod=config.vocab_size - 1)
        runs = [_run(name, args, corpus=corpus, work=Path(tmp)) for name in names]
    single = next((r for r in runs if r["layout"] == "single" and "error" not in r), None)
    print(f"{args.model}, seq {args.seq_len}, {args.precision}, global batch {args.global_batch}, "
          f"{args.iters} iterations, " + (f"{available} GPUs" if args.device == "cuda" else "CPU (gloo)"))
    print(f"{'layout':<12} {'procs':>5} {'max loss rel diff':>18} {'tok/s/gpu':>10} {'step s':>8} {'peak GiB':>9}")
    for run in runs:
        if "error" in run:
            print(f"{run['layout']:<12} failed: {run['error'].strip().splitlines()[-1]}")
            continue
        if single is not None:
            diffs = np.abs(np.array(run["losses"]) - single["losses"]) / np.abs(single["losses"])
            run["max_loss_rel_diff"] = float(diffs.max())
        peak = f"{run['peak_memory_gib']:.1f}" if run["peak_memory_gib"] is not None else "-"
        print(f"{run['layout']:<12} {run['processes']:>5} {run.get('max_loss_rel_diff', float('nan')):>18.2e} "
              f"{run['tokens_per_s_per_gpu']:>10.0f} {run['step_time_s']:>8.3f} {peak:>9}")
    if skipped:
        print(f"skipped (need more GPUs): {', '.join(skipped)}")
    result = {"model": args.model, "seq_len": args.seq_len, "precision": args.precision, "iters": args.iters,
              "global_batch": args.global_batch, "device": args.device, "runs": runs, "skipped": skipped}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
