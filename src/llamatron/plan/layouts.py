"""Which layouts a job can use on N GPUs, what each needs per GPU, and which to recommend.

A layout is tp x pp x cp x dp over the GPUs plus its memory options (distributed optimizer, activation
checkpointing, optimizer offload). Every one the trainer would accept is evaluated; for each parallel
layout the fastest expected memory option that fits is kept (speed.py), and the recommendation is the
fastest expected of those that fit. TP stays within a node (its collectives run in every block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from llamatron.errors import LlamatronError
from llamatron.model.config import LlamaConfig
from llamatron.plan.memory import (
    AC_MODES,
    GIB,
    OPTIMIZER_OFFLOAD_MODES,
    Layout,
    MemoryEstimate,
    Workload,
    estimate_memory,
)
from llamatron.plan.speed import relative_overhead

# Cheapest first among equally fast options: recomputing costs time, offloading activations costs PCIe time.
_AC_ORDER = {"none": 0, "sel": 1, "offload": 2, "full": 3}


@dataclass(kw_only=True, frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    fits: bool
    overhead: float
    """Expected step time over the ideal, minus one (speed.py)."""
    unsupported: tuple[str, ...] = ()
    """Why the installed trainer refuses this layout (options not built yet, combinations it rejects)."""
    host_per_node: float = 0.0
    """Pinned host bytes of one node's ranks (optimizer and activation offload)."""
    shortfall: float = 0.0
    """Bytes over the GPU's memory plus bytes over the node's host memory (0 when it fits)."""

    @property
    def runnable(self) -> bool:
        return not self.unsupported

    def sort_key(self) -> tuple:
        """Those that fit first, the fastest expected first (then the least model parallelism, the least
        recomputation, no offload, the least memory); then those that do not, the smallest first."""
        lay = self.layout
        if not self.fits:
            return (1, self.shortfall)
        return (0, not self.runnable, round(self.overhead, 3), lay.tp * lay.pp * lay.cp,
                _AC_ORDER[lay.activation_checkpoint], lay.optimizer_offload != "none", self.memory.allocated)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_workload(work: Workload, layout: Layout, *, global_batch: int | None) -> Workload:
    """The workload as `layout` runs it: micro-batches per step on each dp rank from the global batch."""
    if global_batch is None:
        return work
    return replace(work, microbatches=max(global_batch // (work.micro_batch * layout.dp), 1))


def layout_problems(config: LlamaConfig, layout: Layout, work: Workload, *, gpus_per_node: int,
                    global_batch: int | None = None) -> list[str]:
    """Every reason the trainer (or this planner's rule of TP within a node) would refuse `layout`."""
    found = []
    if global_batch is not None and global_batch % (work.micro_batch * layout.dp):
        found.append(f"global batch {global_batch} is not divisible by micro batch {work.micro_batch} x dp {layout.dp}")
        return found
    work = layout_workload(work, layout, global_batch=global_batch)
    tp, pp, cp, vp = layout.tp, layout.pp, layout.cp, layout.virtual_pipeline
    if tp > 1:
        if tp > config.num_kv_heads:
            found.append(f"tp={tp} is above the model's {config.num_kv_heads} KV heads")
        sizes = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
                 "ffn hidden size": config.ffn_hidden_size, "vocabulary size": config.vocab_size}
        found += [f"the model's {what} ({size}) is not divisible by tp={tp}" for what, size in sizes.items() if size % tp]
        if tp > gpus_per_node:
            found.append(f"tp={tp} spans nodes of {gpus_per_node} GPUs (TP communicates in every block)")
    if config.num_layers % (pp * vp):
        found.append(f"the model's {config.num_layers} layers do not split evenly into pp*virtual_pipeline={pp * vp}")
    # Context parallelism cuts the sequence into 2*cp load-balanced chunks; sequence parallelism then
    # splits each rank's part over tp.
    step = math.lcm(2 * cp if cp > 1 else 1, cp * tp if layout.sp else 1)
    if work.seq_len % step:
        found.append(f"seq_len {work.seq_len} is not divisible by {step} (cp={cp}, tp={tp}"
                     f"{' with sequence parallelism' if layout.sp else ''})")
    if work.microbatches is not None and pp > 1 and work.microbatches < pp:
        found.append(f"{work.microbatches} micro-batches per step cannot fill pp={pp} stages")
    blocks = config.num_layers // (pp * vp) if config.num_layers % (pp * vp) == 0 else 0
    if layout.activation_checkpoint == "full" and blocks and blocks % layout.ac_layers:
        found.append(f"ac_layers={layout.ac_layers} does not divide the {blocks} blocks of a stage")
    if layout.activation_checkpoint == "offload" and blocks and layout.ac_layers > blocks:
        found.append(f"ac_layers={layout.ac_layers} is above the {blocks} blocks of a stage")
    return found


def parallel_layouts(config: LlamaConfig, work: Workload, *, gpus: int, gpus_per_node: int,
                     global_batch: int | None = None, virtual_pipeline: int = 1, sequence_parallel: bool = True,
                     fixed: dict[str, int] | None = None, grad_reduce_in_bf16: bool = False) -> list[Layout]:
    """Every tp x pp x cp x dp of `gpus` the trainer accepts (with `fixed` degrees pinned), each with and
    (when there is more than one data-parallel rank) without the distributed optimizer."""
    fixed = fixed or {}
    found = []
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            for cp in divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                degrees = {"tp": tp, "pp": pp, "cp": cp, "dp": dp}
                if any(degrees[name] != value for name, value in fixed.items()):
                    continue
                vp = virtual_pipeline if pp > 1 else 1
                layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, virtual_pipeline=vp, sequence_parallel=sequence_parallel,
                                grad_reduce_in_bf16=grad_reduce_in_bf16)
                if layout_problems(config, layout, work, gpus_per_node=gpus_per_node, global_batch=global_batch):
                    continue
                found.append(layout)
                if dp * cp > 1:
                    found.append(replace(layout, distributed_optimizer=False))
    return found


def memory_options(config: LlamaConfig, layout: Layout, work: Workload, *, gpu_mem_gib: float,
                   ac_modes: Iterable[str] = AC_MODES,
                   offload_modes: Iterable[str] = OPTIMIZER_OFFLOAD_MODES) -> list[Layout]:
    """`layout` under each activation-checkpointing and optimizer-offload choice. full uses groups of one
    block (the least memory); offload takes the fewest leading blocks per stage that fit, else all."""
    blocks = config.num_layers // (layout.pp * layout.virtual_pipeline)
    options = []
    for offload in offload_modes:
        for mode in ac_modes:
            base = replace(layout, activation_checkpoint=mode, ac_layers=1, optimizer_offload=offload)
            if mode == "offload":
                base = _fewest_offloaded(config, base, work, blocks=blocks, gpu_mem_gib=gpu_mem_gib)
            options.append(base)
    return options


def _fewest_offloaded(config: LlamaConfig, layout: Layout, work: Workload, *, blocks: int,
                      gpu_mem_gib: float) -> Layout:
    """Binary search: memory falls as more leading blocks are offloaded."""
    def fits(k: int) -> bool:
        return estimate_memory(config, replace(layout, ac_layers=k), work).total <= gpu_mem_gib * GIB

    low, high = 1, blocks
    if not fits(high):
        return replace(layout, ac_layers=blocks)
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return replace(layout, ac_layers=low)


def evaluate(config: LlamaConfig, layout: Layout, work: Workload, *, gpu_mem_gib: float, gpus_per_node: int,
             host_mem_gib: float | None = None,
             unsupported: Callable[[Layout, Workload], list[str]] | None = None) -> Candidate:
    memory = estimate_memory(config, layout, work)
    host = memory.host * min(gpus_per_node, layout.gpus)
    shortfall = max(0.0, memory.total - gpu_mem_gib * GIB)
    if host_mem_gib is not None:
        shortfall += max(0.0, host - host_mem_gib * GIB)
    return Candidate(
        layout=layout, memory=memory, fits=shortfall == 0.0, host_per_node=host, shortfall=shortfall,
        overhead=relative_overhead(config, layout, work, gpus_per_node=gpus_per_node),
        unsupported=tuple(unsupported(layout, work)) if unsupported else (),
    )


def plan_layouts(
    config: LlamaConfig, work: Workload, *, gpus: int, gpus_per_node: int, gpu_mem_gib: float,
    global_batch: int | None = None, host_mem_gib: float | None = None, virtual_pipeline: int = 1,
    sequence_parallel: bool = True, fixed: dict[str, int] | None = None,
    ac_modes: Iterable[str] = AC_MODES, offload_modes: Iterable[str] = OPTIMIZER_OFFLOAD_MODES,
    unsupported: Callable[[Layout, Workload], list[str]] | None = None, grad_reduce_in_bf16: bool = False,
) -> list[Candidate]:
    """Every layout under every memory option, best first (Candidate.sort_key)."""
    ac_modes, offload_modes = list(ac_modes), list(offload_modes)
    found = []
    layouts = parallel_layouts(config, work, gpus=gpus, gpus_per_node=gpus_per_node, global_batch=global_batch,
                               virtual_pipeline=virtual_pipeline, sequence_parallel=sequence_parallel, fixed=fixed,
                               grad_reduce_in_bf16=grad_reduce_in_bf16)
    for layout in layouts:
        layout_work = layout_workload(work, layout, global_batch=global_batch)
        found += [
            evaluate(config, option, layout_work, gpu_mem_gib=gpu_mem_gib, gpus_per_node=gpus_per_node,
                     host_mem_gib=host_mem_gib, unsupported=unsupported)
            for option in memory_options(config, layout, layout_work, gpu_mem_gib=gpu_mem_gib, ac_modes=ac_modes,
                                         offload_modes=offload_modes)
            if not layout_problems(config, option, layout_work, gpus_per_node=gpus_per_node)
        ]
    return sorted(found, key=Candidate.sort_key)


def best_per_layout(candidates: list[Candidate]) -> list[Candidate]:
    """The first (best) memory option of each parallel layout, in the candidates' order."""
    seen, best = set(), []
    for candidate in candidates:
        lay = candidate.layout
        key = (lay.tp, lay.pp, lay.cp, lay.virtual_pipeline, lay.distributed_optimizer)
        if key not in seen:
            seen.add(key)
            best.append(candidate)
    return best


def recommend(candidates: list[Candidate]) -> Candidate | None:
    """The fastest expected layout that fits and the trainer accepts; else the fastest that fits."""
    fitting = [c for c in candidates if c.fits]
    runnable = [c for c in fitting if c.runnable]
    pool = runnable or fitting
    return min(pool, key=Candidate.sort_key) if pool else None


def check_request(config: LlamaConfig, work: Workload, *, gpus: int, nodes: int) -> None:
    """The request's own mistakes, all at once."""
    problems = []
    if gpus < 1:
        problems.append(f"--gpus must be >= 1, got {gpus}")
    if nodes < 1 or (gpus >= 1 and gpus % nodes):
        problems.append(f"--nodes {nodes} does not divide --gpus {gpus}; give the GPUs of all nodes together")
    if work.seq_len < 2:
        problems.append(f"--seq-len must be >= 2, got {work.seq_len}")
    if work.micro_batch < 1:
        problems.append(f"--micro-batch must be >= 1, got {work.micro_batch}")
    if work.seq_len > config.max_position_embeddings:
        problems.append(f"--seq-len {work.seq_len} exceeds the model's {config.max_position_embeddings} positions")
    if problems:
        raise LlamatronError("; ".join(problems))


def train_options(layout: Layout, work: Workload, *, model: str, global_batch: int | None = None,
                  fused_loss_option: bool | None = None) -> list[str]:
    """`llamatron train` overrides that run `layout` (every parallel option spelled out, so the command
    does not depend on a recipe's values). fused_loss_option: whether to pass training.fused_loss; None:
    when the installed trainer's config has that field."""
    import dataclasses

    from llamatron.config.job import TrainingSection

    fields = {f.name for f in dataclasses.fields(TrainingSection)}
    if fused_loss_option is None:
        fused_loss_option = "fused_loss" in fields
    options = [
        f"--model.name={model}",
        f"--training.seq_len={work.seq_len}",
        f"--training.micro_batch_size={work.micro_batch}",
        f"--training.precision={work.precision}",
    ]
    if global_batch is not None:
        options.append(f"--training.global_batch_size={global_batch}")
    if fused_loss_option:
        options.append(f"--training.fused_loss={str(work.fused_loss).lower()}")
    if "compile" in fields:
        options.append(f"--training.compile={str(work.compile).lower()}")
    options += [
        f"--parallel.tp={layout.tp}",
        f"--parallel.pp={layout.pp}",
        f"--parallel.cp={layout.cp}",
        f"--parallel.virtual_pipeline={layout.virtual_pipeline}",
        f"--parallel.sequence_parallel={str(layout.sp).lower()}",
        f"--parallel.distributed_optimizer={str(layout.distributed_optimizer).lower()}",
        f"--parallel.activation_checkpoint={layout.activation_checkpoint}",
        f"--parallel.ac_layers={layout.ac_layers}",
        f"--parallel.optimizer_offload={layout.optimizer_offload}",
    ]
    if layout.grad_reduce_in_bf16:
        options.append("--parallel.grad_reduce_in_bf16=true")
    return options


def launch_options(*, gpus: int, nodes: int) -> list[str]:
    """torchrun's part of the command: one node, or every node with its own --node-rank."""
    options = [f"--nproc-per-node={gpus // nodes}"]
    if nodes > 1:
        options += [f"--nnodes={nodes}", "--node-rank=NODE_RANK", "--master-addr=MASTER_ADDR", "--master-port=29500"]
    return options


def describe(layout: Layout) -> str:
    """tp2·pp1·cp1·dp4 style."""
    parts = f"tp{layout.tp} pp{layout.pp} cp{layout.cp} dp{layout.dp}"
    if layout.virtual_pipeline > 1:
        parts += f" vp{layout.virtual_pipeline}"
    return parts


def describe_ac(layout: Layout) -> str:
    mode = layout.activation_checkpoint
    return f"{mode}/{layout.ac_layers}" if mode in ("full", "offload") else mode
