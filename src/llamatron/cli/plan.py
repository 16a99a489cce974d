"""`llamatron plan`: per-GPU memory of a training job under every layout of N GPUs, whether it fits, the
layout to use and its `llamatron train` options; or, with --from-measurement, a run measured at reduced
depth extrapolated to the full model (docs/plan.md explains both tables)."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

_DEFAULT_GPU_GIB = 80.0
_GPUS_PER_NODE = 8


def resolve_model(name: str):
    """(LlamaConfig, the name `llamatron train --model.name` takes): a preset, an alias, or a HF directory
    (only its config.json is read)."""
    from llamatron.errors import LlamatronError
    from llamatron.model.config import PRESET_ALIASES, from_hf_config, preset

    path = Path(name)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise LlamatronError(f"--model {name}: a directory without config.json; pass a HF model directory or a preset")
        try:
            raw = json.loads(config_file.read_text())
        except ValueError as err:
            raise LlamatronError(f"{config_file} is not valid JSON ({err})") from None
        return from_hf_config(raw, source=str(config_file)), str(path)
    return preset(name), PRESET_ALIASES.get(name, name)


def local_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def _default_nodes(gpus: int) -> int:
    from llamatron.errors import LlamatronError

    if gpus <= _GPUS_PER_NODE:
        return 1
    if gpus % _GPUS_PER_NODE:
        raise LlamatronError(f"--gpus {gpus} over several nodes: give --nodes (GPUs per node = gpus / nodes)")
    return gpus // _GPUS_PER_NODE


def _trainer_refusals(model_name: str, *, global_batch: int | None):
    """What the installed trainer refuses for a layout: options not built yet, and its own layout checks
    (e.g. combinations it does not run), so the plan follows the trainer as it grows."""
    from llamatron.config.job import JobConfig
    from llamatron.errors import LlamatronError
    from llamatron.train import trainer

    def check(layout, work) -> list[str]:
        job = JobConfig()
        job.model.name = model_name
        p, t = job.parallel, job.training
        p.tp, p.pp, p.cp, p.virtual_pipeline = layout.tp, layout.pp, layout.cp, layout.virtual_pipeline
        p.sequence_parallel, p.distributed_optimizer = layout.sp, layout.distributed_optimizer
        p.activation_checkpoint, p.ac_layers = layout.activation_checkpoint, layout.ac_layers
        p.optimizer_offload, p.grad_reduce_in_bf16 = layout.optimizer_offload, layout.grad_reduce_in_bf16
        t.precision, t.seq_len, t.micro_batch_size = work.precision, work.seq_len, work.micro_batch
        stages = layout.pp * layout.virtual_pipeline if layout.pp > 1 else 1
        t.global_batch_size = global_batch or work.micro_batch * layout.dp * stages
        found = list(trainer.unsupported_features(job))
        # A directory without weights cannot be resolved this way: then the plan's own checks stand.
        with contextlib.suppress(LlamatronError):
            found += trainer.layout_problems(job, world_size=layout.gpus)
        return found

    return check


def _choice(value: str | None, choices: tuple[str, ...], flag: str) -> list[str]:
    from llamatron.errors import LlamatronError

    if value is None:
        return list(choices)
    if value not in choices:
        raise LlamatronError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    return [value]


def plan_command(
    model: str | None = typer.Option(
        None, "--model", help="8B, 70B, a preset (llama3.1-8b, llama3.2-1b, ...) or a HF directory (required; "
        "with --from-measurement the file's model by default)."),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs in all (every node's together; required)."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Training sequence length (required)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Micro batch per data-parallel rank."),
    global_batch: int | None = typer.Option(
        None, "--global-batch", help="Global batch (samples). Default: gradient accumulation assumed (gradients "
        "resident during forward; 8 micro-batches per step for the pipeline bubble)."),
    gpu_mem: float | None = typer.Option(
        None, "--gpu-mem", help="GiB per GPU. Default: this machine's GPU, else 80."),
    nodes: int | None = typer.Option(None, "--nodes", help="Nodes (default: 1 up to 8 GPUs, else GPUs / 8)."),
    host_mem: float | None = typer.Option(
        None, "--host-mem", help="GiB of host memory per node for optimizer/activation offload (default: not checked)."),
    precision: str = typer.Option("bf16", "--precision", help="bf16, fp16, fp8 or fp32."),
    fused_loss: bool = typer.Option(True, "--fused-loss/--no-fused-loss",
                                    help="training.fused_loss (applies without TP and outside fp16)."),
    compile_blocks: bool = typer.Option(False, "--compile/--no-compile",
                                        help="training.compile (compiled blocks keep less for backward)."),
    sequence_parallel: bool = typer.Option(True, "--sequence-parallel/--no-sequence-parallel",
                                           help="Sequence parallelism with tp > 1."),
    virtual_pipeline: int = typer.Option(1, "--virtual-pipeline", help="Virtual stages per rank with pp > 1."),
    grad_reduce_in_bf16: bool = typer.Option(
        False, "--grad-reduce-in-bf16", help="parallel.grad_reduce_in_bf16: gradients summed in bf16 (bf16/fp8)."),
    tp: int | None = typer.Option(None, "--tp", help="Only layouts with this tensor-parallel degree."),
    pp: int | None = typer.Option(None, "--pp", help="Only layouts with this pipeline degree."),
    cp: int | None = typer.Option(None, "--cp", help="Only layouts with this context-parallel degree."),
    ac: str | None = typer.Option(None, "--ac", help="Only this activation checkpointing: none, sel, full, offload."),
    optimizer_offload: str | None = typer.Option(None, "--optimizer-offload", help="Only this: none or static."),
    show_all: bool = typer.Option(False, "--all", help="Every memory option of every layout, not the best of each."),
    top: int = typer.Option(20, "--top", help="Rows to show (--all or not); the JSON has all."),
    json_path: str | None = typer.Option(None, "--json", help="Write the plan as JSON to this file ('-': stdout)."),
    from_measurement: Path | None = typer.Option(
        None, "--from-measurement", help="A run measured at reduced depth (JSON, bench/plan_depth_bench.py): "
        "extrapolate it to the full model on --gpus or --target-gpus."),
    target_gpus: str | None = typer.Option(None, "--target-gpus", help="With --from-measurement: GPU counts, e.g. 8,64."),
) -> None:
    """Per-GPU memory (parameters, gradients, optimizer, activations per AC mode, loss, buffers) of every
    layout of --gpus GPUs, which fit in --gpu-mem, the recommended one and its `llamatron train` options."""
    fixed = {"tp": tp, "pp": pp, "cp": cp}
    if from_measurement is not None:
        _extrapolate_command(from_measurement, model=model, targets=_target_counts(target_gpus, default=gpus),
                             nodes=nodes, gpu_mem=gpu_mem, fixed=fixed, ac=ac, optimizer_offload=optimizer_offload,
                             json_path=json_path)
        return
    request = _build_request(
        model=model, gpus=gpus, seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch,
        gpu_mem=gpu_mem, nodes=nodes, host_mem=host_mem, precision=precision, fused_loss=fused_loss,
        compile_blocks=compile_blocks, sequence_parallel=sequence_parallel, virtual_pipeline=virtual_pipeline, fixed=fixed, ac=ac,
        optimizer_offload=optimizer_offload, grad_reduce_in_bf16=grad_reduce_in_bf16)
    _run_plan(request, show_all=show_all, top=top, json_path=json_path)


@dataclass(kw_only=True)
class _Request:
    """A validated `llamatron plan` request."""

    config: Any
    model_name: str
    work: Any
    gpus: int
    nodes: int
    gpu_gib: float
    host_gib: float | None
    global_batch: int | None
    fixed: dict[str, int]
    ac_modes: list[str]
    offload_modes: list[str]
    virtual_pipeline: int
    sequence_parallel: bool
    grad_reduce_in_bf16: bool

    def summary(self) -> dict[str, Any]:
        work = self.work
        return {"model": self.model_name, "gpus": self.gpus, "nodes": self.nodes, "gpu_mem_gib": self.gpu_gib,
                "host_mem_gib": self.host_gib, "seq_len": work.seq_len, "micro_batch": work.micro_batch,
                "global_batch": self.global_batch, "precision": work.precision, "fused_loss": work.fused_loss,
                "compile": work.compile, "grad_reduce_in_bf16": self.grad_reduce_in_bf16}


def _build_request(*, model, gpus, seq_len, micro_batch, global_batch, gpu_mem, nodes, host_mem, precision,
                   fused_loss, compile_blocks, sequence_parallel, virtual_pipeline, fixed, ac, optimizer_offload,
                   grad_reduce_in_bf16) -> _Request:
    from llamatron.errors import LlamatronError
    from llamatron.plan.layouts import check_request
    from llamatron.plan.memory import AC_MODES, COMPUTE_BYTES, OPTIMIZER_OFFLOAD_MODES, Workload

    missing = [flag for flag, value in (("--model", model), ("--gpus", gpus), ("--seq-len", seq_len)) if value is None]
    if missing:
        raise LlamatronError(f"missing {', '.join(missing)} (e.g. llamatron plan --model 8B --gpus 8 --seq-len 8192)")
    config, model_name = resolve_model(model)
    if precision not in COMPUTE_BYTES:
        raise LlamatronError(f"--precision {precision!r} is not one of {', '.join(COMPUTE_BYTES)}")
    problems = [f"--{name} must be >= 1, got {value}" for name, value in
                {**fixed, "virtual-pipeline": virtual_pipeline, "global-batch": global_batch}.items()
                if value is not None and value < 1]
    problems += [f"{flag} must be positive, got {value}" for flag, value in
                 (("--gpu-mem", gpu_mem), ("--host-mem", host_mem)) if value is not None and value <= 0]
    if grad_reduce_in_bf16 and precision not in ("bf16", "fp8"):
        problems.append(f"--grad-reduce-in-bf16 needs --precision bf16 or fp8, not {precision}")
    if problems:
        raise LlamatronError("; ".join(problems))
    work = Workload(seq_len=seq_len, micro_batch=micro_batch, precision=precision, fused_loss=fused_loss,
                    compile=compile_blocks)
    nodes = nodes if nodes is not None else _default_nodes(gpus)
    check_request(config, work, gpus=gpus, nodes=nodes)
    return _Request(
        config=config, model_name=model_name, work=work, gpus=gpus, nodes=nodes,
        gpu_gib=gpu_mem if gpu_mem is not None else (local_gpu_gib() or _DEFAULT_GPU_GIB), host_gib=host_mem,
        global_batch=global_batch, fixed={name: value for name, value in fixed.items() if value is not None},
        ac_modes=_choice(ac, AC_MODES, "--ac"),
        offload_modes=_choice(optimizer_offload, OPTIMIZER_OFFLOAD_MODES, "--optimizer-offload"),
        virtual_pipeline=virtual_pipeline, sequence_parallel=sequence_parallel, grad_reduce_in_bf16=grad_reduce_in_bf16,
    )


def _run_plan(request: _Request, *, show_all: bool, top: int, json_path: str | None) -> None:
    from llamatron.errors import LlamatronError
    from llamatron.plan import layouts as lay
    from llamatron.plan.report import plan_json, print_plan

    r = request
    candidates = lay.plan_layouts(
        r.config, r.work, gpus=r.gpus, gpus_per_node=r.gpus // r.nodes, gpu_mem_gib=r.gpu_gib,
        global_batch=r.global_batch, host_mem_gib=r.host_gib, virtual_pipeline=r.virtual_pipeline,
        sequence_parallel=r.sequence_parallel, fixed=r.fixed, ac_modes=r.ac_modes, offload_modes=r.offload_modes,
        unsupported=_trainer_refusals(r.model_name, global_batch=r.global_batch),
        grad_reduce_in_bf16=r.grad_reduce_in_bf16,
    )
    if not candidates:
        raise LlamatronError(_no_layout_reason(r))
    best = lay.recommend(candidates)
    command = None
    if best is not None:
        work = lay.layout_workload(r.work, best.layout, global_batch=r.global_batch)
        options = lay.train_options(best.layout, work, model=r.model_name, global_batch=r.global_batch)
        command = ["llamatron", "train", *lay.launch_options(gpus=r.gpus, nodes=r.nodes), *options]
    shown = candidates if show_all else lay.best_per_layout(candidates)
    if json_path != "-":
        print_plan(r.summary(), shown, best=best, command=command, top=top, every=candidates)
    if json_path is not None:
        _write_json(plan_json(r.summary(), shown, best=best, command=command), json_path)


def _extrapolate_command(path: Path, *, model: str | None, targets: list[int], nodes: int | None,
                         gpu_mem: float | None, fixed: dict[str, int | None], ac: str | None,
                         optimizer_offload: str | None, json_path: str | None) -> None:
    """The full model on each target GPU count, from a run measured at reduced depth."""
    from dataclasses import replace

    from llamatron.errors import LlamatronError
    from llamatron.plan.extrapolate import extrapolate, memory_residual, read_measurement, residual_warning
    from llamatron.plan.memory import AC_MODES, OPTIMIZER_OFFLOAD_MODES
    from llamatron.plan.report import extrapolation_json, print_extrapolation

    bad = [f"--{name} must be >= 1, got {value}" for name, value in fixed.items() if value is not None and value < 1]
    if bad:
        raise LlamatronError("; ".join(bad))
    measurement = read_measurement(path)
    config, _ = resolve_model(model or measurement.model)
    gpu_gib = gpu_mem if gpu_mem is not None else (local_gpu_gib() or _DEFAULT_GPU_GIB)
    changes: dict[str, Any] = {name: value for name, value in fixed.items() if value is not None}
    if ac is not None:
        changes["activation_checkpoint"] = _choice(ac, AC_MODES, "--ac")[0]
    if optimizer_offload is not None:
        changes["optimizer_offload"] = _choice(optimizer_offload, OPTIMIZER_OFFLOAD_MODES, "--optimizer-offload")[0]
    results = []
    for gpus in targets:
        layout = replace(measurement.layout, **changes)
        model_parallel = layout.tp * layout.pp * layout.cp
        if gpus % model_parallel:
            raise LlamatronError(f"{gpus} GPUs are not divisible by tp*pp*cp = {model_parallel}")
        per_node = gpus // (nodes if nodes is not None else _default_nodes(gpus))
        results.append(extrapolate(config, measurement, gpus=gpus, layout=replace(layout, dp=gpus // model_parallel),
                                   gpus_per_node=per_node))
    residual = memory_residual(config, measurement)
    warning = residual_warning(config, measurement)
    if json_path != "-":
        print_extrapolation(measurement, results, residual=residual, gpu_gib=gpu_gib, warning=warning)
    if json_path is not None:
        _write_json(extrapolation_json(measurement, results, residual=residual, gpu_gib=gpu_gib, warning=warning),
                    json_path)


def _target_counts(text: str | None, *, default: int | None) -> list[int]:
    from llamatron.errors import LlamatronError

    if text is None:
        if default is None:
            raise LlamatronError("--from-measurement needs the target GPU count: --gpus N or --target-gpus 8,64")
        return [default]
    try:
        counts = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise LlamatronError(f"--target-gpus {text!r}: expected GPU counts such as 8,64") from None
    if not counts or min(counts) < 1:
        raise LlamatronError(f"--target-gpus {text!r}: expected positive GPU counts such as 8,64")
    return counts


def _no_layout_reason(request: _Request) -> str:
    """Why nothing qualifies: the pinned degrees' problems, or a general message."""
    from llamatron.plan.layouts import layout_problems
    from llamatron.plan.memory import Layout

    r = request
    if r.fixed:
        tp, pp, cp = r.fixed.get("tp", 1), r.fixed.get("pp", 1), r.fixed.get("cp", 1)
        if r.gpus % (tp * pp * cp):
            return f"--gpus {r.gpus} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}"
        layout = Layout(tp=tp, pp=pp, cp=cp, dp=r.gpus // (tp * pp * cp), sequence_parallel=r.sequence_parallel,
                        virtual_pipeline=r.virtual_pipeline if pp > 1 else 1)
        problems = layout_problems(r.config, layout, r.work, gpus_per_node=r.gpus // r.nodes,
                                   global_batch=r.global_batch)
        if problems:
            return f"no layout with {', '.join(f'{k}={v}' for k, v in r.fixed.items())}: " + "; ".join(problems)
    return f"no layout of {r.gpus} GPUs suits this model and sequence length (check --seq-len and --global-batch)"


def _write_json(data: dict[str, Any], path: str) -> None:
    text = json.dumps(data, indent=1)
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    from llamatron.checkpoint.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), (text + "\n").encode())


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
