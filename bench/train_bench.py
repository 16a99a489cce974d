"""Training throughput of `llamatron train` on random tokens: tokens/s per GPU, MFU, peak memory, against
HF transformers on the same card in the same command (issue 8 scenario (a)).

The speed matrix on one GPU (each variant a separate training process, one after another):
    python bench/train_bench.py --model llama3.2-1b --seq-len 4096 --micro-batch 2 --steps 15 \\
        --variants hf,eager,fused,compile,fused+compile --out bench.json
Variants: hf (bench/hf_train_baseline.py), eager (plain loss, no compile), fused (fused output layer + loss),
compile (compiled blocks), fused+compile, default (the trainer's defaults). On N GPUs of one node (FSDP over
all of them): --nproc N. Before and after a change, in one command: --baseline-src REV/src (the `src`
directory of the earlier code, from `git archive REV src | tar -x -C REV`) runs each llamatron variant first
with that code, as VARIANT@REV, then with the installed one; repeat it to time several revisions.

Figures: for llamatron the trainer's own per-step records (metrics.jsonl, one per step): tokens/s =
tokens of the steps after --warmup-steps / their summed step time, as hf_train_baseline.py aggregates
(tokens per step / mean step time); the trainer's logged per-step rates, averaged, are reported beside
it ("logged"), so the trainer's log and the bench cannot disagree unseen. MFU: 6 * N + 12 * L * H * d * T
FLOPs per token (N without the input embedding; train/metrics.py) against 989 TFLOP/s dense bf16 for
H100/H200. Peak memory: torch.cuda.max_memory_allocated of rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name -> trainer overrides; None for the HF baseline
VARIANTS: dict[str, list[str] | None] = {
    "hf": None,
    "default": [],
    "eager": ["--training.fused_loss=false", "--training.compile=false"],
    "fused": ["--training.fused_loss=true", "--training.compile=false"],
    "compile": ["--training.fused_loss=false", "--training.compile=true"],
    "fused+compile": ["--training.fused_loss=true", "--training.compile=true"],
}


def write_random_corpus(prefix: Path, *, tokens: int, vocab: int, seed: int = 0) -> None:
    from llamatron.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        remaining = tokens
        while remaining > 0:
            length = int(min(remaining, rng.integers(512, 8192)))
            writer.add_document(rng.integers(0, vocab, size=length, dtype=np.int32))
            remaining -= length


def trainer_runs(variants: list[str], *, baseline_srcs: list[Path]) -> list[tuple[str, str, Path | None]]:
    """(label, variant, source directory or None for the installed code) of each run, in order: each variant
    runs first with every earlier revision's code, then with the installed one, so drift on the machine hits
    them alike. A revision is labelled by the folder that holds its src (old/src -> VARIANT@old)."""
    runs = []
    for variant in variants:
        if VARIANTS[variant] is not None:
            runs += [(f"{variant}@{src.parent.name or 'base'}", variant, src) for src in baseline_srcs]
        runs.append((variant, variant, None))
    return runs


def source_env(src: Path | None) -> dict[str, str]:
    """The environment of a training run: the earlier code's src directory ahead of everything else."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_trainer(run_dir: Path, overrides: list[str], *, nproc: int, timeout: float,
                src: Path | None = None) -> tuple[list[dict], float]:
    """`llamatron train` in a subprocess (with `src`'s code where given); its metrics.jsonl records and the
    wall time."""
    if run_dir.exists():  # the trainer would append to its metrics.jsonl and the figures would mix two runs
        raise SystemExit(f"{run_dir} exists from an earlier run; pass a new --workdir")
    cmd = [sys.executable, "-m", "llamatron.cli.main", "train", "--output", str(run_dir), *overrides]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=source_env(src), timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"training failed with exit code {proc.returncode}: {' '.join(cmd)}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, wall


def summarize(records: list[dict], *, warmup_steps: int, tokens_per_step: int, gpus: int,
              flops_per_token: float, peak_tflops: float | None) -> dict:
    """Throughput over the records after the warm-up ones (one record per step: logging.log_interval=1)."""
    steady = records[warmup_steps:]
    if not steady:
        raise ValueError(f"{len(records)} steps logged, none after {warmup_steps} warm-up steps; raise --steps")
    # Revisions 03bf615..6365fc9 (run through --baseline-src) timed a CUDA step by the host's clock a step
    # late: each record holds the next step's time and the last ~0 s. Dropping that last record leaves the
    # steady steps' own times (shifted by one, which the mean does not see).
    times = sorted(r["step_time_s"] for r in steady)
    late_log = len(steady) > 2 and steady[-1]["step_time_s"] < 0.3 * times[len(times) // 2]
    if late_log:
        steady = steady[:-1]
    mean_step = sum(r["step_time_s"] for r in steady) / len(steady)
    per_gpu = tokens_per_step / mean_step / gpus
    logged_mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "tokens_per_s_per_gpu": per_gpu,
        "mfu": per_gpu * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None,
        "step_time_s": mean_step,
        "logged_tokens_per_s_per_gpu": float(np.mean([r["tokens_per_s_per_gpu"] for r in steady])),
        "logged_mfu": float(np.mean(logged_mfu)) if logged_mfu else None,
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0.0) for r in records),
        "alloc_retries": max((r.get("alloc_retries") or 0) for r in records),
        "first_step_s": records[0]["step_time_s"],
        "losses": [r["loss"] for r in records],
        "last_step_dropped": late_log,
    }


def table(rows: list[dict], *, baseline: str | None) -> str:
    """A Markdown table of the variants (the ratio column against `baseline`'s tokens/s)."""
    base = next((r["tokens_per_s_per_gpu"] for r in rows if r["variant"] == baseline), None)
    lines = ["| variant | micro batch x accumulation | tokens/s/GPU | MFU | peak memory GiB | "
             + (f"vs {baseline} | " if base else "") + "first step s | wall s |",
             "|---|---|---|---|---|" + ("---|" if base else "") + "---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['tokens_per_s_per_gpu'] / base:.2f}x | " if base else ""
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "-"
        batch = f"{r.get('micro_batch', '?')} x {r.get('grad_accum', 1)}"
        lines.append(f"| {r['variant']} | {batch} | {r['tokens_per_s_per_gpu']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} | "
                     f"{ratio}{first} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def run_hf(args: argparse.Namespace, work: Path) -> dict:
    out = work / "hf.json"
    cmd = [sys.executable, str(Path(__file__).with_name("hf_train_baseline.py")), "--model", args.model,
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.hf_micro_batch or args.micro_batch),
           "--grad-accum", str(args.hf_grad_accum or args.grad_accum), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=args.timeout)
    result = json.loads(out.read_text())
    return {**result, "variant": "hf", "wall_s": time.perf_counter() - start, "first_step_s": None}


def _profile_window(extra: list[str]) -> list[int] | None:
    """The iterations the --extra overrides profile (logging.profile_iterations), if any."""
    from llamatron.config.job import JobConfig
    from llamatron.config.load import apply_overrides

    return apply_overrides(JobConfig(), extra).logging.profile_iterations if extra else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--hf-micro-batch", type=int, default=None,
                        help="HF's micro batch when it must differ (memory); default --micro-batch")
    parser.add_argument("--hf-grad-accum", type=int, default=None,
                        help="HF's micro-batches per step; with --hf-micro-batch, the same global batch as llamatron")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script at tiny scale")
    parser.add_argument("--variants", default="default", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more --section.field=value override for every run, written --extra=--a.b=c; repeatable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--baseline-src", type=Path, action="append", default=[],
                        help="an earlier revision's src directory (REV/src from `git archive REV src`): each variant "
                        "runs with it too, first, labelled VARIANT@REV; repeatable (a bisection in one command)")
    parser.add_argument("--out", default="train_bench.json")
    parser.add_argument("--workdir", default=None, help="where the corpus and run directories go (default: a new "
                        "temporary directory); a run's profile (--extra --logging.profile_iterations=A,B) is "
                        "in WORKDIR/run-VARIANT/profile")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    import torch

    from llamatron.model import preset
    from llamatron.train.metrics import device_peak_tflops, flops_per_token

    config = preset(args.model)
    global_batch = args.micro_batch * args.nproc * args.grad_accum
    device = torch.device(args.device)
    peak = device_peak_tflops(device) if device.type == "cuda" and torch.cuda.is_available() else None
    fpt = flops_per_token(config, seq_len=args.seq_len)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llamatron-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "random_text_document"
    write_random_corpus(corpus, tokens=(args.steps + 2) * global_batch * (args.seq_len + 1) * 102 // 100,
                        vocab=config.vocab_size)
    common = [
        f"--model.name={args.model}", f"--data.data_path={corpus}", "--data.split=100,0,0",
        f"--training.seq_len={args.seq_len}", f"--training.micro_batch_size={args.micro_batch}",
        f"--training.global_batch_size={global_batch}", f"--train-iters={args.steps}",
        f"--training.precision={args.precision}", "--training.eval_interval=0", f"--training.device={args.device}",
        "--checkpoint.save_interval=1000000", "--checkpoint.save_at_end=false", "--logging.tensorboard=false",
        "--logging.log_interval=1", "--optim.lr=1e-4", "--optim.min_lr=1e-5",
    ]
    rows = []
    for label, variant, src in trainer_runs(variants, baseline_srcs=args.baseline_src):
        print(f"== {label}", flush=True)
        if VARIANTS[variant] is None:
            rows.append(run_hf(args, work))
            continue
        records, wall = run_trainer(work / f"run-{label}", [*common, *VARIANTS[variant], *args.extra],
                                    nproc=args.nproc, timeout=args.timeout, src=src)
        # Profiled iterations run slower (the profiler's own overhead): left out of the figures.
        window = _profile_window(args.extra)
        if window is not None:
            records = [r for r in records if not window[0] <= r["iteration"] <= window[1]]
        summary = summarize(records, warmup_steps=args.warmup_steps, tokens_per_step=global_batch * args.seq_len,
                            gpus=args.nproc, flops_per_token=fpt, peak_tflops=peak)
        rows.append({"variant": label, "overrides": VARIANTS[variant] + args.extra, "wall_s": wall,
                     "source": str(src) if src is not None else "installed",
                     "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, **summary})
    result = {
        "model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "gpus": args.nproc,
        "global_batch": global_batch, "precision": args.precision, "steps": args.steps,
        "warmup_steps": args.warmup_steps, "flops_per_token": fpt, "peak_tflops": peak,
        "device": torch.cuda.get_device_name(device) if peak is not None else args.device,
        "torch": torch.__version__, "runs": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    baseline = "hf" if "hf" in variants else ("eager" if "eager" in variants else None)
    print(f"\n{args.model}, sequence {args.seq_len}, micro batch {args.micro_batch}, {args.nproc} GPU(s), "
          f"{args.precision}, {result['device']}, torch {torch.__version__}")
    print(table(rows, baseline=baseline))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
