"""From a model measured at reduced depth to the full model on more GPUs (issue 7's 70B question).

Input: a measurement (JSON, written by bench/plan_depth_bench.py or by hand): the full model, the layout
and GPU count it ran on, and two or more runs of the same job with the model cut to fewer layers, each
with the trainer's peak memory (peak_memory_gib) and throughput (tokens_per_s_per_gpu):

    {"model": "llama3.1-70b", "gpus": 2, "seq_len": 8192, "micro_batch": 1, "global_batch": 2,
     "precision": "bf16", "fused_loss": true,
     "layout": {"tp": 1, "pp": 1, "cp": 1, "distributed_optimizer": true, "activation_checkpoint": "full",
                "ac_layers": 1, "optimizer_offload": "none", "sequence_parallel": true},
     "runs": [{"layers": 2, "peak_memory_gib": 41.2, "tokens_per_s_per_gpu": 1510.0},
              {"layers": 4, "peak_memory_gib": 47.9, "tokens_per_s_per_gpu": 820.0}]}

Memory: the model (memory.py) predicts each run; what it misses is fitted as a line in the number of
layer activations a GPU holds (a constant plus a per-layer part) and added to its prediction for the
full model on the target GPUs. Time: the time per token per GPU, 1 / (tokens/s/GPU), is a line in the
depth (a per-layer cost plus the embedding, loss and optimizer); at full depth that is the measured
layout's. For the target, speed.py's estimate of what each layout adds (FSDP traffic, across nodes too;
TP/CP collectives; recomputation; offload) replaces the measured layout's, and its pipeline bubble
replaces the measured one. The target layout is the measured one
with data parallelism grown to the target GPU count, unless degrees or modes are given; each rank keeps
the measured micro-batches per step (the global batch grows with the data-parallel size).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamatron.errors import LlamatronError
from llamatron.model.config import LlamaConfig
from llamatron.plan.memory import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_GIB,
    GIB,
    Layout,
    MemoryEstimate,
    Workload,
    chunks_in_flight,
    estimate_memory,
)
from llamatron.plan.speed import PEAK_FLOPS, estimate_step, per_token
from llamatron.train.metrics import flops_per_token

_LAYOUT_FIELDS = {f.name for f in dataclasses.fields(Layout)} - {"dp"}


@dataclass(kw_only=True, frozen=True)
class Run:
    layers: int
    peak_memory_gib: float | None
    tokens_per_s_per_gpu: float | None


@dataclass(kw_only=True, frozen=True)
class Measurement:
    model: str
    gpus: int
    layout: Layout
    work: Workload
    global_batch: int | None
    runs: tuple[Run, ...]
    card: str | None = None


@dataclass(kw_only=True, frozen=True)
class Extrapolation:
    gpus: int
    layout: Layout
    layers: int
    memory: MemoryEstimate
    """The model's prediction for the full model on the target."""
    memory_correction: float
    """Bytes added from what the model missed on the measured runs (may be negative)."""
    tokens_per_s_per_gpu: float | None
    mfu: float | None

    @property
    def allocated(self) -> float:
        return self.memory.allocated + self.memory_correction

    @property
    def total(self) -> float:
        return self.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB


def read_measurement(path: Path) -> Measurement:
    """Parse a measurement file; every problem is reported at once."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LlamatronError(f"--from-measurement {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise LlamatronError(f"--from-measurement {path}: not a JSON file ({err})") from None
    return parse_measurement(raw, source=str(path))


def parse_measurement(raw: Any, *, source: str) -> Measurement:
    problems = []
    if not isinstance(raw, dict):
        raise LlamatronError(f"{source}: expected a JSON object, see docs/plan.md")
    for key in ("model", "gpus", "seq_len", "runs"):
        if key not in raw:
            problems.append(f"missing {key!r}")
    layout_raw = raw.get("layout", {})
    unknown = set(layout_raw) - _LAYOUT_FIELDS if isinstance(layout_raw, dict) else {"(not an object)"}
    if unknown:
        problems.append(f"unknown layout field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_LAYOUT_FIELDS))})")
    runs = []
    for index, run in enumerate(raw.get("runs") or []):
        if not isinstance(run, dict) or "layers" not in run:
            problems.append(f"runs[{index}] needs 'layers'")
            continue
        runs.append(Run(layers=int(run["layers"]), peak_memory_gib=run.get("peak_memory_gib"),
                        tokens_per_s_per_gpu=run.get("tokens_per_s_per_gpu")))
    if len({run.layers for run in runs}) < 2:
        problems.append("needs runs at two or more different depths (layers) to separate the per-layer part")
    if problems:
        raise LlamatronError(f"{source}: " + "; ".join(problems))
    gpus = int(raw["gpus"])
    fields = dict(layout_raw)
    model_parallel = fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1)
    if gpus % model_parallel:
        raise LlamatronError(f"{source}: gpus {gpus} is not divisible by tp*pp*cp = {model_parallel}")
    layout = Layout(**fields, dp=gpus // model_parallel)
    global_batch = raw.get("global_batch")
    micro_batch = int(raw.get("micro_batch", 1))
    work = Workload(seq_len=int(raw["seq_len"]), micro_batch=micro_batch, precision=raw.get("precision", "bf16"),
                    fused_loss=bool(raw.get("fused_loss", True)),
                    microbatches=None if global_batch is None else max(global_batch // (micro_batch * layout.dp), 1))
    return Measurement(model=str(raw["model"]), gpus=gpus, layout=layout, work=work, global_batch=global_batch,
                       runs=tuple(sorted(runs, key=lambda r: r.layers)), card=raw.get("card"))


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def held_layers(config: LlamaConfig, layout: Layout, work: Workload) -> int:
    """Layer activations the first pipeline rank holds at once (all of them when pp = 1)."""
    inflight = chunks_in_flight(layout, stage=0, microbatches=work.microbatches)
    return inflight * config.num_layers // (layout.pp * layout.virtual_pipeline)


def memory_residual(config: LlamaConfig, measurement: Measurement) -> tuple[float, float] | None:
    """(constant, per held layer) bytes the model missed on the measured runs, or None without memory."""
    runs = [run for run in measurement.runs if run.peak_memory_gib is not None]
    if len({run.layers for run in runs}) < 2:
        return None
    xs, ys = [], []
    for run in runs:
        cut = config.replace(num_layers=run.layers)
        predicted = estimate_memory(cut, measurement.layout, measurement.work).allocated
        xs.append(held_layers(cut, measurement.layout, measurement.work))
        ys.append(run.peak_memory_gib * GIB - predicted)
    return _line(xs, ys)


def residual_warning(config: LlamaConfig, measurement: Measurement) -> str | None:
    """A sentence when the measured memory per layer is far (> 15%) from the model's: the measurement's
    layout or options probably do not describe the run (e.g. a missing optimizer_offload)."""
    residual = memory_residual(config, measurement)
    runs = [run for run in measurement.runs if run.peak_memory_gib is not None]
    if residual is None:
        return None
    low, high = runs[0], runs[-1]
    cuts = [config.replace(num_layers=run.layers) for run in (low, high)]
    predicted = [estimate_memory(cut, measurement.layout, measurement.work).allocated for cut in cuts]
    held = [held_layers(cut, measurement.layout, measurement.work) for cut in cuts]
    model_slope = (predicted[1] - predicted[0]) / max(held[1] - held[0], 1)
    if model_slope and abs(residual[1] / model_slope) > 0.15:
        return (f"the measured memory grows by {(model_slope + residual[1]) / GIB:.2f} GiB per layer, the model's "
                f"by {model_slope / GIB:.2f}: check the measurement's layout and options (the extrapolation "
                "trusts the measurement)")
    return None


def extrapolate(config: LlamaConfig, measurement: Measurement, *, gpus: int, layout: Layout | None = None,
                gpus_per_node: int = 8) -> Extrapolation:
    """The full model (config) on `gpus` GPUs with `layout` (default: the measured one, dp grown)."""
    measured = measurement.layout
    if layout is None:
        model_parallel = measured.tp * measured.pp * measured.cp
        if gpus % model_parallel:
            raise LlamatronError(f"{gpus} GPUs are not divisible by the measured tp*pp*cp = {model_parallel}")
        layout = replace(measured, dp=gpus // model_parallel)
    # Each rank keeps the measured micro-batches per step (the global batch grows with dp).
    work = measurement.work
    memory = estimate_memory(config, layout, work)
    residual = memory_residual(config, measurement)
    correction = 0.0
    if residual is not None:
        correction = residual[0] + residual[1] * held_layers(config, layout, work)

    tokens_per_s = mfu = None
    timed = [run for run in measurement.runs if run.tokens_per_s_per_gpu]
    if len({run.layers for run in timed}) >= 2:
        base, per_layer = _line([run.layers for run in timed], [1.0 / run.tokens_per_s_per_gpu for run in timed])
        measured_full = base + per_layer * config.num_layers  # per token per GPU, the measured layout at depth
        before = estimate_step(config, measured, measurement.work, gpus_per_node=gpus_per_node)
        after = estimate_step(config, layout, work, gpus_per_node=gpus_per_node)
        core = measured_full / (1 + before.bubble) - per_token(before.extra_s, measured, measurement.work)
        # A measurement faster than the estimate of its own overheads (e.g. on another kind of device)
        # keeps at least a tenth of its time as compute.
        core = max(core, 0.1 * measured_full / (1 + before.bubble))
        seconds_per_token = (core + per_token(after.extra_s, layout, work)) * (1 + after.bubble)
        tokens_per_s = 1.0 / seconds_per_token
        mfu = tokens_per_s * flops_per_token(config, seq_len=work.seq_len) / PEAK_FLOPS
    return Extrapolation(gpus=gpus, layout=layout, layers=config.num_layers, memory=memory,
                         memory_correction=correction, tokens_per_s_per_gpu=tokens_per_s, mfu=mfu)
