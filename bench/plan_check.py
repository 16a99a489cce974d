"""`llamatron plan`'s memory prediction against the peaks bench/train_bench.py measured.

After GPU runs of bench/train_bench.py (any layouts, through --extra overrides), e.g.
    python bench/train_bench.py --model llama3.1-8b --seq-len 8192 --nproc 2 --steps 8 --warmup-steps 3 \\
        --variants eager,fused --extra=--parallel.tp=2 --extra=--parallel.sequence_parallel=true --out tp2.json
    python bench/plan_check.py tp2.json fsdp2.json --json plan_check.json
prints, for every trainer run in those files, the measured peak (the trainer's peak_memory_gib), the plan's
prediction for the same model, sequence, batch and options, and the error; those rows are the cases to add
to tests/unit/plan/test_calibration.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def predict(bench: dict, run: dict) -> dict:
    """The plan's prediction for one train_bench run (its model, sizes and overrides)."""
    from llamatron.config.job import JobConfig
    from llamatron.config.load import apply_overrides
    from llamatron.model.config import preset
    from llamatron.plan.layouts import describe, describe_ac
    from llamatron.plan.memory import GIB, Layout, Workload, estimate_memory

    job = apply_overrides(JobConfig(), run.get("overrides") or [])
    p, t = job.parallel, job.training
    gpus, micro = bench["gpus"], bench["micro_batch"]
    dp = gpus // (p.tp * p.pp * p.cp)
    layout = Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, virtual_pipeline=p.virtual_pipeline,
                    sequence_parallel=p.sequence_parallel, distributed_optimizer=p.distributed_optimizer,
                    activation_checkpoint=p.activation_checkpoint, ac_layers=p.ac_layers,
                    optimizer_offload=p.optimizer_offload, reshard_after_forward=p.reshard_after_forward)
    work = Workload(seq_len=bench["seq_len"], micro_batch=micro, precision=bench["precision"],
                    fused_loss=bool(getattr(t, "fused_loss", False)), compile=bool(getattr(t, "compile", False)),
                    microbatches=max(bench["global_batch"] // (micro * dp), 1))
    estimate = estimate_memory(preset(bench["model"]), layout, work)
    measured = run.get("peak_memory_gib")
    predicted = estimate.allocated / GIB
    return {
        "model": bench["model"], "device": bench.get("device"), "gpus": gpus, "seq_len": bench["seq_len"],
        "micro_batch": micro, "variant": run.get("variant"), "layout": describe(layout), "ac": describe_ac(layout),
        "optimizer_offload": layout.optimizer_offload, "fused_loss": work.fused_loss, "compile": work.compile,
        "measured_gib": measured, "predicted_gib": predicted, "peak_at": estimate.phase,
        "error": predicted / measured - 1 if measured else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="bench/train_bench.py outputs")
    parser.add_argument("--json", help="Write the rows here too.")
    args = parser.parse_args()
    rows = []
    for path in args.files:
        bench = json.loads(Path(path).read_text())
        rows += [predict(bench, run) for run in bench.get("runs", []) if run.get("variant") != "hf"]
    print("| model | GPUs | seq | mb | layout | AC | opt offload | fused loss | compile | measured GiB | predicted GiB "
          "| error | peak at |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        measured = "-" if r["measured_gib"] is None else f"{r['measured_gib']:.1f}"
        error = "-" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        print(f"| {r['model']} | {r['gpus']} | {r['seq_len']} | {r['micro_batch']} | {r['layout']} | {r['ac']} | "
              f"{r['optimizer_offload']} | {r['fused_loss']} | {r['compile']} | {measured} | "
              f"{r['predicted_gib']:.1f} | {error} | {r['peak_at']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
