"""Training throughput of `llamatron train` on random tokens: tokens/s per GPU, MFU, peak memory.

One command per scenario, e.g. on one GPU:
    python bench/train_bench.py --model llama3.2-1b --seq-len 4096 --micro-batch 2 --steps 20 --out bench.json
and on N GPUs of one node (FSDP over all of them):
    python bench/train_bench.py --model llama3.1-8b --seq-len 8192 --nproc 2 --steps 15

The figures are the trainer's own logged ones (metrics.jsonl), averaged after --warmup-steps, so the
bench and the trainer cannot disagree. FLOPs per token: 6 * N + 12 * L * H * d * T (N without the input
embedding), against 989 TFLOP/s dense bf16 for H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_random_corpus(prefix: Path, *, tokens: int, vocab: int, seed: int = 0) -> None:
    from llamatron.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        remaining = tokens
        while remaining > 0:
            length = int(min(remaining, rng.integers(512, 8192)))
            writer.add_document(rng.integers(0, vocab, size=length, dtype=np.int32))
            remaining -= length


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--extra", nargs="*", default=[], help="more --section.field=value overrides")
    parser.add_argument("--out", default="train_bench.json")
    args = parser.parse_args()

    from llamatron.model import preset

    config = preset(args.model)
    global_batch = args.micro_batch * args.nproc * args.grad_accum
    work = Path(tempfile.mkdtemp(prefix="llamatron-bench-"))
    corpus = work / "random_text_document"
    write_random_corpus(corpus, tokens=(args.steps + 2) * global_batch * (args.seq_len + 1) * 102 // 100,
                        vocab=config.vocab_size)
    cmd = [
        sys.executable, "-m", "llamatron.cli.main", "train", "--output", str(work / "run"),
        f"--model.name={args.model}", f"--data.data_path={corpus}", "--data.split=100,0,0",
        f"--training.seq_len={args.seq_len}", f"--training.micro_batch_size={args.micro_batch}",
        f"--training.global_batch_size={global_batch}", f"--train-iters={args.steps}",
        f"--training.precision={args.precision}", "--training.eval_interval=0", "--training.device=cuda",
        "--checkpoint.save_interval=1000000", "--checkpoint.save_at_end=false", "--logging.tensorboard=false",
        "--optim.lr=1e-4", "--optim.min_lr=1e-5", *args.extra,
    ]
    if args.nproc > 1:
        cmd += ["--nproc-per-node", str(args.nproc)]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        print(f"training failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = records[args.warmup_steps :]
    result = {
        "model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "gpus": args.nproc,
        "global_batch": global_batch, "precision": args.precision, "steps": args.steps,
        "tokens_per_s_per_gpu": statistics.mean(r["tokens_per_s_per_gpu"] for r in steady),
        "mfu": statistics.mean(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None,
        "peak_memory_gib": max(r["peak_memory_gib"] or 0 for r in records),
        "losses": [r["loss"] for r in records],
        "extra": args.extra,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
