"""The plan as a table (rich) and as JSON; the same for an extrapolation from a measured run."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from rich.console import Console
from rich.table import Table

from llamatron.plan.extrapolate import Extrapolation, Measurement
from llamatron.plan.layouts import Candidate, describe, describe_ac
from llamatron.plan.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, GIB

_COMPONENTS = (("params", "params"), ("param_copies", "copies"), ("grads", "grads"), ("optimizer", "optim"),
               ("activations", "activ"), ("loss", "loss"), ("buffers", "buffers"))


def _console() -> Console:
    console = Console()
    # Piped or captured output keeps the whole table on one line per row.
    return console if console.is_terminal else Console(width=220)


def _layout_cells(candidate: Candidate) -> list[str]:
    lay = candidate.layout
    return [describe(lay), "yes" if lay.distributed_optimizer else "no", describe_ac(lay), lay.optimizer_offload]


def print_plan(request: dict, candidates: list[Candidate], *, best: Candidate | None, command: list[str] | None,
               top: int, every: list[Candidate] | None = None) -> None:
    """The table of `candidates` (the first `top`), the recommendation and its command; `every` (all the
    options evaluated) tells what comes closest when nothing fits."""
    console = _console()
    gib = request["gpu_mem_gib"]
    console.print(
        f"llamatron plan: {request['model']}, {request['gpus']} GPUs ({request['nodes']} node"
        f"{'s' if request['nodes'] > 1 else ''}), seq {request['seq_len']}, micro batch {request['micro_batch']}"
        f"{'' if request['global_batch'] is None else ', global batch ' + str(request['global_batch'])}, "
        f"{request['precision']}{', gradients reduced in bf16' if request.get('grad_reduce_in_bf16') else ''}, "
        f"{gib:.1f} GiB per GPU"
        f"{'' if request['host_mem_gib'] is None else ', ' + format(request['host_mem_gib'], '.0f') + ' GiB host per node'}",
        highlight=False)
    table = Table(show_lines=False, header_style="bold")
    host = any(c.host_per_node for c in candidates[:top])
    for name in ("layout", "dist opt", "AC", "opt offload", *(label for _, label in _COMPONENTS), "alloc", "total",
                 *(("host/node",) if host else ()), "fits", "+time", "peak at"):
        table.add_column(name, justify="right" if name not in ("layout", "AC", "peak at") else "left")
    for candidate in candidates[:top]:
        parts = candidate.memory.gib()
        fits = "yes" if candidate.fits else "NO"
        note = "!" if not candidate.runnable else ""
        host_cell = (f"{candidate.host_per_node / GIB:.0f}",) if host else ()
        table.add_row(*_layout_cells(candidate), *(f"{parts[key]:.1f}" for key, _ in _COMPONENTS),
                      f"{parts['allocated']:.1f}", f"{parts['total']:.1f}", *host_cell, fits + note,
                      f"{candidate.overhead * 100:.0f}%", candidate.memory.phase)
    console.print(table)
    if len(candidates) > top:
        console.print(f"{len(candidates) - top} more rows: --top {len(candidates)} (or --json)", highlight=False)
    refused = [c for c in candidates[:top] if not c.runnable]
    if refused:
        reasons = sorted({reason for c in refused for reason in c.unsupported})
        console.print(f"!: `llamatron train` refuses this layout for now ({'; '.join(reasons)})", highlight=False)
    console.print(
        f"GiB per GPU at the step's peak: alloc is what the trainer logs as peak_memory_gib; total = alloc x "
        f"{1 + ALLOCATOR_SLACK:.2f} + {CUDA_CONTEXT_GIB:.1f} (allocator slack, CUDA context and NCCL)"
        f"{'; host/node: pinned host GiB of a node (offload)' if host else ''}. +time: expected step time over an "
        "ideal run (for ranking). docs/plan.md explains each column.", highlight=False)
    if best is None:
        smallest = min(candidates, key=lambda c: c.shortfall)
        host = request["host_mem_gib"]
        if smallest.memory.total <= gib * GIB and host is not None:
            why = (f"the closest, on the GPU, {describe(smallest.layout)} with AC {describe_ac(smallest.layout)} and "
                   f"optimizer offload {smallest.layout.optimizer_offload} ({smallest.memory.total / GIB:.1f} GiB), "
                   f"needs {smallest.host_per_node / GIB:.0f} GiB of host memory per node, above --host-mem {host:.0f}")
        else:
            why = (f"the closest, {describe(smallest.layout)} with AC {describe_ac(smallest.layout)} and optimizer "
                   f"offload {smallest.layout.optimizer_offload}, needs {smallest.memory.total / GIB:.1f} GiB per GPU")
        console.print(f"No layout fits: {why}. More GPUs, a shorter sequence or a smaller micro batch would help.",
                      highlight=False)
        on_gpu = [c for c in every or candidates if c.memory.total <= gib * GIB]
        if on_gpu and host is not None:
            least = min(on_gpu, key=lambda c: c.host_per_node)
            console.print(f"On the GPU alone {describe(least.layout)} with AC {describe_ac(least.layout)} and "
                          f"optimizer offload {least.layout.optimizer_offload} fits ({least.memory.total / GIB:.1f} "
                          f"GiB), but its offload needs {least.host_per_node / GIB:.0f} GiB of host memory per node.",
                          highlight=False)
        return
    lay = best.layout
    console.print(
        f"Recommended: {describe(lay)}, distributed optimizer {'on' if lay.distributed_optimizer else 'off'}, "
        f"AC {describe_ac(lay)}, optimizer offload {lay.optimizer_offload}: {best.memory.total / GIB:.1f} of "
        f"{gib:.1f} GiB per GPU" + ("" if best.runnable else
                                    f" (`llamatron train` refuses it for now: {'; '.join(best.unsupported)})"),
        highlight=False)
    console.print("  " + shlex.join(command) + " --config RECIPE --data.data_path=DATA_PREFIX", highlight=False,
                  soft_wrap=True)


def candidate_json(candidate: Candidate) -> dict[str, Any]:
    return {
        "layout": dataclasses.asdict(candidate.layout),
        "memory_gib": candidate.memory.gib(),
        "peak_phase": candidate.memory.phase,
        "peak_stage": candidate.memory.stage,
        "fits": candidate.fits,
        "relative_overhead": candidate.overhead,
        "unsupported_by_train": list(candidate.unsupported),
        "host_gib_per_node": candidate.host_per_node / GIB,
    }


def plan_json(request: dict, candidates: list[Candidate], *, best: Candidate | None,
              command: list[str] | None) -> dict[str, Any]:
    recommended = None
    if best is not None:
        recommended = {**candidate_json(best), "train_command": command}
    return {
        "request": request,
        "constants": {"allocator_slack": ALLOCATOR_SLACK, "cuda_context_gib": CUDA_CONTEXT_GIB},
        "candidates": [candidate_json(c) for c in candidates],
        "recommended": recommended,
    }


def print_extrapolation(measurement: Measurement, results: list[Extrapolation], *, residual: tuple[float, float] | None,
                        gpu_gib: float, warning: str | None = None) -> None:
    console = _console()
    runs = "; ".join(
        f"{run.layers} layers: {'?' if run.peak_memory_gib is None else format(run.peak_memory_gib, '.1f')} GiB, "
        f"{'?' if run.tokens_per_s_per_gpu is None else format(run.tokens_per_s_per_gpu, ',.0f')} tok/s/GPU"
        for run in measurement.runs)
    console.print(f"Measured {measurement.model} on {measurement.gpus} GPU(s) ({describe(measurement.layout)}, AC "
                  f"{describe_ac(measurement.layout)}{', ' + measurement.card if measurement.card else ''}): {runs}",
                  highlight=False)
    if residual is not None:
        console.print(f"Memory the model missed on those runs: {residual[0] / GIB:+.2f} GiB + "
                      f"{residual[1] / GIB:+.3f} GiB per layer held (added below)", highlight=False)
    if warning:
        console.print(f"Warning: {warning}.", highlight=False)
    table = Table(header_style="bold")
    for name in ("GPUs", "layout", "AC", "opt offload", "layers", "model GiB", "corrected GiB", "total GiB", "fits",
                 "tok/s/GPU", "MFU"):
        table.add_column(name, justify="left" if name in ("layout", "AC") else "right")
    for result in results:
        lay = result.layout
        table.add_row(
            str(result.gpus), describe(lay), describe_ac(lay), lay.optimizer_offload, str(result.layers),
            f"{result.memory.allocated / GIB:.1f}", f"{result.allocated / GIB:.1f}", f"{result.total / GIB:.1f}",
            "yes" if result.total <= gpu_gib * GIB else "NO",
            "?" if result.tokens_per_s_per_gpu is None else f"{result.tokens_per_s_per_gpu:,.0f}",
            "?" if result.mfu is None else f"{result.mfu * 100:.1f}%")
    console.print(table)


def extrapolation_json(measurement: Measurement, results: list[Extrapolation], *,
                       residual: tuple[float, float] | None, gpu_gib: float, warning: str | None = None) -> dict[str, Any]:
    return {
        "warning": warning,
        "measurement": {"model": measurement.model, "gpus": measurement.gpus,
                        "layout": dataclasses.asdict(measurement.layout),
                        "runs": [dataclasses.asdict(run) for run in measurement.runs]},
        "residual_gib": None if residual is None else {"constant": residual[0] / GIB,
                                                       "per_layer_held": residual[1] / GIB},
        "targets": [
            {"gpus": r.gpus, "layers": r.layers, "layout": dataclasses.asdict(r.layout),
             "model_gib": r.memory.gib(), "corrected_allocated_gib": r.allocated / GIB,
             "corrected_total_gib": r.total / GIB, "fits": r.total <= gpu_gib * GIB,
             "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu, "mfu": r.mfu}
            for r in results
        ],
    }
