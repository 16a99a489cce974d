"""A model's layer shapes at reduced depth under `llamatron train`: per-layer memory and time, written as
the measurement `llamatron plan --from-measurement` extrapolates to the full depth on more GPUs.

For issue 7's 70B question on 2 GPUs (one JSON for all depths; then the extrapolation to 8 and 64 GPUs):
    python bench/plan_depth_bench.py --model llama3.1-70b --layers 2 4 --nproc 2 --seq-len 8192 \\
        --steps 6 --warmup-steps 3 --json 70b-depth.json -- --parallel.activation_checkpoint=full
    llamatron plan --from-measurement 70b-depth.json --target-gpus 8,64

Each depth is a HF directory holding the model's config.json with num_hidden_layers cut (and a one-tensor
safetensors file, since a model directory must have weights; training starts from a random init), trained
on random tokens. The figures are the trainer's own (metrics.jsonl): the peak of peak_memory_gib and the
mean tokens_per_s_per_gpu after the warm-up steps. Arguments after `--` are `llamatron train` overrides;
the parallel ones become the measurement's layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def layout_from_overrides(overrides: list[str]) -> dict:
    """The measurement's layout: the trainer's parallel options after the overrides."""
    from llamatron.config.job import JobConfig
    from llamatron.config.load import apply_overrides
    from llamatron.plan.memory import Layout

    parallel = apply_overrides(JobConfig(), overrides).parallel if overrides else JobConfig().parallel
    names = {f.name for f in dataclasses.fields(Layout)} - {"dp"}
    return {name: getattr(parallel, name) for name in sorted(names)}


def training_value(overrides: list[str], name: str, default):
    from llamatron.config.job import JobConfig
    from llamatron.config.load import apply_overrides

    training = apply_overrides(JobConfig(), overrides).training if overrides else JobConfig().training
    return getattr(training, name, default)


def summarize(records: list[dict], *, warmup_steps: int) -> dict:
    """Peak memory over every step (GPU only, else None) and mean throughput after the warm-up."""
    steady = records[warmup_steps:] or records
    peaks = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
    return {"peak_memory_gib": max(peaks) if peaks else None,
            "tokens_per_s_per_gpu": statistics.mean(r["tokens_per_s_per_gpu"] for r in steady)}


def write_model_dir(directory: Path, config) -> None:
    """A HF directory with the (cut) model's config.json and a placeholder weight file."""
    import torch
    from safetensors.torch import save_file

    from llamatron.model.config import to_hf_config

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(to_hf_config(config), indent=1))
    save_file({"placeholder": torch.zeros(1)}, str(directory / "model.safetensors"))


def run_depth(args, *, model_dir: Path, corpus: Path, work: Path, overrides: list[str]) -> dict:
    global_batch = args.micro_batch * args.nproc * args.grad_accum
    run_dir = work / f"run-{model_dir.name}"
    cmd = [
        sys.executable, "-m", "llamatron.cli.main", "train", "--output", str(run_dir),
        f"--model.name={model_dir}", f"--data.data_path={corpus}", "--data.split=100,0,0",
        f"--training.seq_len={args.seq_len}", f"--training.micro_batch_size={args.micro_batch}",
        f"--training.global_batch_size={global_batch}", f"--train-iters={args.steps}",
        f"--training.precision={args.precision}", "--training.eval_interval=0", f"--training.device={args.device}",
        "--checkpoint.save_interval=1000000", "--checkpoint.save_at_end=false", "--logging.tensorboard=false",
        "--optim.lr=1e-4", "--optim.min_lr=1e-5", *overrides,
    ]
    if args.nproc > 1:
        cmd += ["--nproc-per-node", str(args.nproc)]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"training {model_dir.name} failed with exit code {proc.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summarize(records, warmup_steps=args.warmup_steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-70b", help="A preset: the full-depth model.")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="Depths to run (two or more).")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check this script at tiny scale.")
    parser.add_argument("--timeout", type=int, default=3600, help="Seconds per depth.")
    parser.add_argument("--json", required=True, help="Where the measurement goes.")
    parser.add_argument("overrides", nargs="*", help="After --: llamatron train overrides (parallel.* etc.).")
    args = parser.parse_args()
    if len(set(args.layers)) < 2:
        parser.error("--layers needs two or more different depths")

    from llamatron.model.config import PRESET_ALIASES, preset

    sys.path.insert(0, str(Path(__file__).parent))
    from train_bench import write_random_corpus

    config = preset(args.model)
    name = PRESET_ALIASES.get(args.model, args.model)
    work = Path(tempfile.mkdtemp(prefix="llamatron-depth-"))
    corpus = work / "random_text_document"
    global_batch = args.micro_batch * args.nproc * args.grad_accum
    write_random_corpus(corpus, tokens=(args.steps + 2) * global_batch * (args.seq_len + 1) * 102 // 100,
                        vocab=config.vocab_size)
    runs = []
    for layers in sorted(set(args.layers)):
        model_dir = work / f"{name}-{layers}-layers"
        write_model_dir(model_dir, config.replace(num_layers=layers))
        runs.append({"layers": layers, **run_depth(args, model_dir=model_dir, corpus=corpus, work=work,
                                                    overrides=args.overrides)})
        print(json.dumps(runs[-1]), flush=True)
    card = None
    if args.device.startswith("cuda"):
        import torch

        card = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    measurement = {
        "model": name, "gpus": args.nproc, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "global_batch": global_batch, "precision": args.precision,
        "fused_loss": bool(training_value(args.overrides, "fused_loss", False)),
        "layout": layout_from_overrides(args.overrides), "card": card, "runs": runs,
        "command": " ".join(sys.argv),
    }
    Path(args.json).write_text(json.dumps(measurement, indent=1))
    print(f"{'layers':>6} {'peak GiB':>9} {'tok/s/GPU':>10}")
    for run in runs:
        peak = "-" if run["peak_memory_gib"] is None else f"{run['peak_memory_gib']:.2f}"
        print(f"{run['layers']:>6} {peak:>9} {run['tokens_per_s_per_gpu']:>10.1f}")
    print(f"wrote {args.json}; next: llamatron plan --from-measurement {args.json} --target-gpus 8,64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
