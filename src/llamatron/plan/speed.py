"""A rough relative step time of a layout, to put the layouts that fit in order, the fastest expected first.

Not a throughput prediction. Every layout of one job does the same model FLOPs per GPU, so only what a
layout adds is estimated, as a fraction of the ideal compute time of one micro-batch on one GPU:
recomputation, the pipeline bubble, communication that cannot hide behind compute (TP/SP and CP inside
the blocks, FSDP's gathers and reduce-scatters when they outlast the compute), and offload traffic.
The constants are the measured ones where this project has a measurement (BENCHMARKS.md), else nominal
hardware figures; they rank layouts, they do not promise tokens per second.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamatron.model.config import LlamaConfig
from llamatron.plan.memory import COMPUTE_BYTES, GIB, Dims, Layout, Workload, block_bytes, stage_params
from llamatron.train.metrics import flops_per_token

PEAK_FLOPS = 989e12  # dense bf16, H100/H200 (the MFU convention of BENCHMARKS.md)
BASE_MFU = 0.45  # llamatron eager, FSDP2, llama3.1-8b at 8192 on H200: 46.9% (BENCHMARKS, issue 6)
NVLINK_BYTES_PER_S = 350e9  # all-gather / reduce-scatter bus bandwidth within an 8-GPU node (nominal)
NETWORK_BYTES_PER_S = 40e9  # per GPU between nodes: one 400 Gb/s NIC per GPU (nominal)
SEL_OVERHEAD = 0.04  # sel vs none, 4 blocks of llama3.1-8b at 8192: 0.154 vs 0.148 s (BENCHMARKS)
OFFLOAD_SECONDS_PER_BYTE = 0.037 / (1.53 * GIB)  # one offloaded 8B block (1.53 GiB) cost 0.037 s (H200)
HOST_ADAM_SECONDS_PER_PARAM = 0.78 / 1.92e9  # static optimizer offload, 1.92B parameters: 0.78 s a step
ASSUMED_MICROBATCHES = 8  # per step and dp rank, when the global batch is not given


def _block_forward_share(config: LlamaConfig, *, seq_len: int) -> float:
    """The blocks' forward FLOPs as a fraction of the step's: what full recomputation repeats."""
    blocks = config.num_params(include_embedding=False) - config.hidden_size
    attention = 4.0 * config.num_layers * config.num_heads * config.dim_per_head * seq_len
    return (2.0 * blocks + attention) / flops_per_token(config, seq_len=seq_len)


@dataclass(frozen=True)
class StepEstimate:
    """One micro-batch on one GPU: ideal compute, what the layout adds, and the pipeline bubble."""

    compute_s: float
    extra_s: float
    bubble: float

    @property
    def overhead(self) -> float:
        """Expected time over the ideal, minus one."""
        return (self.compute_s + self.extra_s) * (1 + self.bubble) / self.compute_s - 1


def per_token(seconds: float, layout: Layout, work: Workload) -> float:
    """Seconds per micro-batch on one GPU as seconds per token per GPU: the tp * cp * pp GPUs of a
    model replica share each micro-batch's mb * seq tokens."""
    return seconds * layout.tp * layout.cp * layout.pp / (work.micro_batch * work.seq_len)


def relative_overhead(
    config: LlamaConfig, layout: Layout, work: Workload, *, gpus_per_node: int = 8
) -> float:
    """Expected step time over the ideal (compute at BASE_MFU, nothing else), minus one."""
    return estimate_step(config, layout, work, gpus_per_node=gpus_per_node).overhead


def estimate_step(config: LlamaConfig, layout: Layout, work: Workload, *, gpus_per_node: int = 8) -> StepEstimate:
    """The ideal compute of a micro-batch on one GPU and the seconds each feature of the layout adds."""
    c = COMPUTE_BYTES[work.precision]
    tokens = work.micro_batch * work.seq_len
    model_parallel = layout.tp * layout.cp * layout.pp
    ideal = flops_per_token(config, seq_len=work.seq_len) * tokens / model_parallel / (PEAK_FLOPS * BASE_MFU)
    microbatches = work.microbatches or ASSUMED_MICROBATCHES
    blocks = config.num_layers // layout.pp
    d = Dims.of(config, tokens=tokens // layout.cp, tp=layout.tp, sequence_parallel=layout.sp, c=c)
    extra = 0.0

    mode = layout.activation_checkpoint
    if mode == "full":
        extra += ideal * _block_forward_share(config, seq_len=work.seq_len)
    elif mode == "sel":
        extra += ideal * SEL_OVERHEAD
    elif mode == "offload":
        offloaded = min(layout.ac_layers, blocks // layout.virtual_pipeline) * layout.virtual_pipeline
        extra += offloaded * block_bytes(d) * OFFLOAD_SECONDS_PER_BYTE

    if layout.tp > 1:
        # Per block: two all-gathers and two reduce-scatters of the (tokens, hidden) stream in forward, the
        # same in backward, and the forward's again when the block is recomputed (sel and full).
        collectives = 8 + (4 if mode in ("sel", "full") else 0)
        volume = c * d.h * d.tokens * (layout.tp - 1) / layout.tp
        extra += blocks * collectives * volume / NVLINK_BYTES_PER_S
    if layout.cp > 1:
        # K/V blocks around the ring in forward, K/V and fp32 dK/dV in backward; counted as exposed.
        ring = (layout.cp - 1) * 2 * d.kv * d.tokens * (c + c + 4)
        extra += blocks * ring / NVLINK_BYTES_PER_S

    shard = layout.shard
    group = layout.dp * layout.cp
    if group > 1:
        p = stage_params(config, layout, stage=0)
        r = layout.reduce_bytes  # fp32 or bf16 gradient reduction
        if layout.distributed_optimizer:  # all-gather in forward and in backward, the reduce-scatter
            volume = p.total * (2 * c + r) * (shard - 1) / shard
        else:  # the all-reduce of the gradients
            volume = p.total * 2 * r * (group - 1) / group
        # The group's ranks are tp apart (tp innermost): it leaves the node when tp * group does.
        bandwidth = NVLINK_BYTES_PER_S if layout.tp * group <= gpus_per_node else NETWORK_BYTES_PER_S
        extra += max(0.0, volume / bandwidth - ideal)

    if layout.optimizer_offload == "static":
        p = stage_params(config, layout, stage=0)
        extra += HOST_ADAM_SECONDS_PER_PARAM * p.total / shard / microbatches

    bubble = (layout.pp - 1) / (layout.virtual_pipeline * microbatches) if layout.pp > 1 else 0.0
    return StepEstimate(compute_s=ideal, extra_s=extra, bubble=bubble)
