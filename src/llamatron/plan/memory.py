"""Per-GPU memory of a training step, by component, derived from the model's forward and the trainer's
parallelism (FSDP2, TP/SP, CP, PP, activation checkpointing, offload).

What is predicted: the peak of torch.cuda.max_memory_allocated, the figure the trainer logs as
peak_memory_gib. Every term is a tensor the trainer really allocates; there is no fitted constant in it.
tests/unit/plan/test_calibration.py checks it against every peak measured in docs/BENCHMARKS.md. A GPU
needs more than that: the CUDA context and NCCL's buffers live outside PyTorch's allocator, and the caching
allocator reserves more than it hands out. `total_bytes` adds the two constants below for those.

Notation (per rank): c bytes per element of the compute dtype; T tokens of one micro-batch on this rank
(micro batch * seq / cp); Tn the tokens the norms see (T / tp under sequence parallelism, else T);
h hidden; q = heads * head_dim, kv = kv_heads * head_dim, f ffn, heads, V vocabulary, each divided by tp
where TP splits it.

What one block saves for backward (model/llama.py, op by op):
- each RMSNorm: its input upcast to fp32 (4 h Tn: saved by pow and by the multiply with rsqrt), the rsqrt
  (4 Tn), the normalised value before the weight (c h Tn: saved by the weight multiply), and its output as
  the next linears see it (c h T: the projections save their input; under SP the all-gathered sequence);
- attention: q and k after RoPE, v, and the output (c (2q + 2kv) T) and the kernel's log-sum-exp (4 heads T,
  fp32). RoPE saves only cos/sin (shared by all blocks); flash and cuDNN keep no (seq x seq) scores;
- SwiGLU: gate output, silu(gate), up output and their product (4 c f T);
- residual adds save nothing, so the block's input itself is not kept.
Without AC that is 2 (4+c) h Tn + 2 c h T + c (2q + 2kv) T + 4 heads T + 4 c f T; for llama3.1-8b at 8192
tokens 1.53 GiB, as measured (BENCHMARKS, "AC modes").
- sel (parallel/ac.py's policy): the outputs of every matmul and of the attention kernel are kept, the
  rest recomputed: the block input c h Tn + c T (q + 2kv [q, k, v projections] + q [attention] + 2h [o and
  down projections, before any reduce-scatter] + 2f [gate, up]) + 4 heads T.
- full with groups of k blocks: one group input per group, c h Tn / k per block.
- offload of the first k blocks of each stage: nothing left on the GPU for them.

FSDP2 (parallel/fsdp.py): fp32 master parameters, fp32 gradients and AdamW's two fp32 moments are sharded
over the dp x cp ranks (distributed_optimizer) or whole on each (replicated). Compute-dtype copies are
all-gathered per block: the last block and the root (embedding, final norm, output layer) are not
resharded after forward, so they stay gathered until the end of backward. A block's backward also holds its
compute-dtype gradients and the fp32 reduce-scatter input and output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamatron.model.config import LlamaConfig

GIB = 2**30

# The only two constants, and neither enters the allocated prediction the calibration tests check. They
# are margins for "does it fit" (not measured here: the benches record max_memory_allocated only).
# CUDA context, cuBLAS/cuDNN workspaces and NCCL's communicator buffers: ~0.5 GiB each side, outside the
# caching allocator.
CUDA_CONTEXT_GIB = 1.0
# The caching allocator reserves more than is allocated at the peak (block rounding, fragmentation);
# a few percent with expandable_segments, more without.
ALLOCATOR_SLACK = 0.05

COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
AC_MODES = ("none", "sel", "full", "offload")
OPTIMIZER_OFFLOAD_MODES = ("none", "static")

# train/fused_loss.py's chunk: ~2**28 logits per chunk, a multiple of 256 tokens between 256 and 16384
# (tests/unit/plan/test_memory.py checks the two agree).
_FUSED_CHUNK_ELEMENTS = 1 << 28


def fused_loss_chunk(vocab: int) -> int:
    return max(256, min(16384, _FUSED_CHUNK_ELEMENTS // vocab // 256 * 256))


@dataclass(kw_only=True, frozen=True)
class Layout:
    """A parallel layout and its memory options, as the trainer's parallel.* options name them."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    virtual_pipeline: int = 1
    sequence_parallel: bool = True
    """Applies with tp > 1 (the trainer's parallel.sequence_parallel)."""
    distributed_optimizer: bool = True
    activation_checkpoint: str = "none"
    ac_layers: int = 1
    """Group size for full; leading blocks of each stage for offload."""
    optimizer_offload: str = "none"
    reshard_after_forward: bool = True
    """parallel.reshard_after_forward; False keeps every block's gathered compute-dtype copy from its
    forward to its backward."""
    grad_reduce_in_bf16: bool = False
    """parallel.grad_reduce_in_bf16: reduce-scatter (all-reduce) buffers of 2 bytes a parameter, not 4."""

    @property
    def reduce_bytes(self) -> int:
        return 2 if self.grad_reduce_in_bf16 else 4

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def shard(self) -> int:
        """Ranks that FSDP2 shards parameters, gradients and optimizer state over."""
        return self.dp * self.cp if self.distributed_optimizer else 1

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1


@dataclass(kw_only=True, frozen=True)
class Workload:
    seq_len: int
    micro_batch: int = 1
    precision: str = "bf16"
    fused_loss: bool = True
    """training.fused_loss; it applies without TP and outside fp16 (as the trainer decides)."""
    microbatches: int | None = None
    """Micro-batches per step on each dp rank (global batch / (micro batch * dp)); None: more than the
    pipeline holds in flight, i.e. gradient accumulation."""
    fused_chunk: int | None = None
    """Tokens per chunk of the fused loss; None: the trainer's default for the vocabulary."""
    compile: bool = False
    """training.compile: each block compiled (less is kept for backward; see block_bytes)."""
    logits_kept: bool = False
    """Whether the plain loss's logits stay referenced through backward. The trainer hands them straight to
    the loss (False); before the fused-loss work its train_step held them in a local (True), as in the
    runs of docs/BENCHMARKS.md dated 2026-11-27."""
    chunk_fp32_kept: bool = False
    """Whether a compiled fused-loss chunk stores its fp32 softmax (C x vocab). The trainer's compiled chunk
    does not (train/fused_loss.py, _chunk_loss_and_grad_fusable: False); before 2026-12-04 (session 5) it
    was compiled from the in-place function and did (True), as in the compiled runs measured until then."""


@dataclass(kw_only=True, frozen=True)
class MemoryEstimate:
    """Bytes on one GPU at the step's peak, by component."""

    params: float = 0.0
    """fp32 master parameters (FSDP shards)."""
    param_copies: float = 0.0
    """Compute-dtype parameters all-gathered at the peak (root, last block, blocks in backward)."""
    grads: float = 0.0
    """fp32 sharded gradients, and compute-dtype unsharded ones not yet reduced."""
    optimizer: float = 0.0
    """AdamW's two fp32 moments (0 with optimizer offload)."""
    activations: float = 0.0
    """What the blocks save for backward, over the micro-batches in flight, plus a recomputed block."""
    loss: float = 0.0
    """Final norm, logits and cross-entropy buffers (or the fused loss's chunk and stored gradients)."""
    buffers: float = 0.0
    """Reduce-scatter buffers, activation gradients of the block in backward, ring/pipeline transfers."""
    phase: str = ""
    """Where the peak is: loss, backward, end of backward, optimizer step."""
    stage: int = 0
    host: float = 0.0
    """Pinned host memory of this rank (optimizer offload, activation offload)."""

    @property
    def allocated(self) -> float:
        return (self.params + self.param_copies + self.grads + self.optimizer + self.activations + self.loss
                + self.buffers)

    @property
    def total(self) -> float:
        """What the GPU must hold: allocated, the allocator's slack and the CUDA context."""
        return self.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB

    def gib(self) -> dict[str, float]:
        names = ("params", "param_copies", "grads", "optimizer", "activations", "loss", "buffers")
        out = {name: getattr(self, name) / GIB for name in names}
        out.update(allocated=self.allocated / GIB, total=self.total / GIB, host=self.host / GIB)
        return out


# ---- shapes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """Per-rank sizes of one micro-batch's tensors (everything TP splits already divided by tp)."""

    h: int
    q: int
    kv: int
    f: int
    heads: int
    vocab: int
    tokens: int
    norm_tokens: int
    c: int

    @classmethod
    def of(cls, config: LlamaConfig, *, tokens: int, tp: int = 1, sequence_parallel: bool = False,
           c: int = 2) -> Dims:
        return cls(h=config.hidden_size, q=config.q_size // tp, kv=config.kv_size // tp,
                   f=config.ffn_hidden_size // tp, heads=config.num_heads // tp, vocab=config.vocab_size // tp,
                   tokens=tokens, norm_tokens=tokens // tp if sequence_parallel and tp > 1 else tokens, c=c)


def _dims(config: LlamaConfig, layout: Layout, work: Workload) -> Dims:
    tokens = work.micro_batch * work.seq_len // layout.cp
    return Dims.of(config, tokens=tokens, tp=layout.tp, sequence_parallel=layout.sp,
                   c=COMPUTE_BYTES[work.precision])


# ---- activations -------------------------------------------------------------------------------
def norm_bytes(d: Dims) -> int:
    """One RMSNorm (with its fp32 rsqrt per token) and the input its output becomes for the next linears."""
    return (4 + d.c) * d.h * d.norm_tokens + 4 * d.norm_tokens + d.c * d.h * d.tokens


def block_bytes(d: Dims, *, mode: str = "none", ac_layers: int = 1, compiled: bool = False,
                fp8: bool = False) -> float:
    """Bytes one block keeps for backward after its forward, under activation checkpointing `mode`
    (offload: a block that is not offloaded; offloaded ones keep 0). compiled: training.compile;
    fp8: torchao's float8 linears (training.precision=fp8)."""
    t = d.tokens
    if mode in ("none", "offload"):
        attention = d.c * (2 * d.q + 2 * d.kv) * t + 4 * d.heads * t
        if not compiled:  # eager fp8 keeps what bf16 keeps: torchao saves the linears' bf16 inputs
            return 2 * norm_bytes(d) + attention + 4 * d.c * d.f * t
        # Compiled (AOTAutograd's min-cut partitioner): each norm keeps its input and rstd, the fp32 math is
        # recomputed; bf16 keeps the norms' outputs (the linears' inputs) and gate, up and their product
        # (silu recomputed); fp8 recomputes the norm outputs and the product (and their fp8 casts) too.
        norms = 2 * (d.c * d.h * d.norm_tokens + 4 * d.norm_tokens)
        if fp8:
            return norms + attention + 2 * d.c * d.f * t
        return norms + 2 * d.c * d.h * t + attention + 3 * d.c * d.f * t
    if mode == "sel":
        saved_outputs = (d.q + 2 * d.kv) + d.q + 2 * d.h + 2 * d.f
        return d.c * d.h * d.norm_tokens + d.c * saved_outputs * t + 4 * d.heads * t
    if mode == "full":
        return d.c * d.h * d.norm_tokens / ac_layers
    raise ValueError(f"unknown activation checkpointing mode {mode!r}")


def backward_work_bytes(d: Dims, *, cp: int = 1) -> float:
    """Activation gradients alive inside a block's backward: the incoming one (c h T) and the larger of
    SwiGLU's backward (the product's, silu's and up's gradients: 3 c f T) and, under CP, ring attention's
    (parallel/ring_attention.py: K/V expanded to the query heads and the kernel's gradients, their fp32
    copies, the fp32 dq accumulator, the dK/dV accumulators in flight: (5c + 16) q T + (2c + 24) kv T)."""
    mlp = 3 * d.c * d.f * d.tokens
    ring = (5 * d.c + 16) * d.q * d.tokens + (2 * d.c + 24) * d.kv * d.tokens if cp > 1 else 0
    return max(mlp, ring) + d.c * d.h * d.tokens


def final_norm_bytes(d: Dims, *, loss: str) -> float:
    """The final RMSNorm; the plain output layer also saves the norm's output (the fused loss does not)."""
    held = (4 + d.c) * d.h * d.norm_tokens + 4 * d.norm_tokens
    return held if loss == "fused" else held + d.c * d.h * d.tokens


def loss_bytes(d: Dims, *, loss: str, logits_kept: bool = False, chunk: int | None = None,
               chunk_fp32: bool = True) -> tuple[float, float]:
    """(held after forward, peak) of the output layer + cross entropy.

    full_logits (train/loss.py): cross entropy's fp32 log-softmax output saved (and the logits in the
    compute dtype if something still references them: logits_kept); its backward then holds the fp32
    gradient of the log-softmax output and of its input at once: peak 12 T V (+ c T V).
    In forward the logits, their labelled rows (a copy), its fp32 copy and the log-softmax output exist
    at once: (2c + 8) T V.
    vocab_parallel (parallel/loss_parallel.py): on V / tp, its peak in forward (logits, their fp32 copy,
    shifted and exp: (c + 12) T V); saved: the fp32 softmax.
    fused (train/fused_loss.py): the labelled rows of h and their gradient (c h T each) and dW accumulated
    in fp32 (4 V h); at a chunk's peak its logits, their fp32 softmax (only where the chunk runs eagerly,
    or compiled the old way: chunk_fp32) and its compute-dtype gradient ((2c + 4) C V) while the previous
    chunk's gradient is still referenced (c C V); after forward dh and dW (compute dtype) stay for backward."""
    t, v = d.tokens, d.vocab
    if loss == "fused":
        size = min(t, chunk or fused_loss_chunk(v))
        held = d.c * d.h * t + d.c * v * d.h
        logits = (2 * d.c + (4 if chunk_fp32 else 0)) * size * v + (d.c * size * v if t > size else 0)
        return held, 2 * d.c * d.h * t + 4 * v * d.h + logits
    kept = d.c if logits_kept else 0
    if loss == "full_logits":  # forward: logits, their labelled rows, the fp32 copy and the log-softmax output
        return (kept + 4) * t * v, max(2 * d.c + 8, kept + 12) * t * v
    if loss == "vocab_parallel":  # forward: logits, the fp32 copy, shifted and exp
        return (kept + 4) * t * v, (d.c + 12) * t * v
    raise ValueError(f"unknown loss path {loss!r}")


def loss_path(layout: Layout, work: Workload) -> str:
    """The loss the trainer runs: vocabulary-parallel under TP, fused where enabled (not fp16), else plain."""
    if layout.tp > 1:
        return "vocab_parallel"
    if work.fused_loss and work.precision != "fp16":
        return "fused"
    return "full_logits"


# ---- parameters --------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class StageParams:
    """Parameter counts on one rank after TP, before FSDP sharding."""

    block: int
    block_matmul: int
    blocks: int
    chunk_blocks: int
    """Blocks of one virtual stage (a pipeline chunk)."""
    embedding: int = 0
    head: int = 0
    """Output layer and final norm on the last stage."""

    @property
    def root(self) -> int:
        return self.embedding + self.head

    @property
    def total(self) -> int:
        return self.block * self.blocks + self.root


def stage_params(config: LlamaConfig, layout: Layout, *, stage: int) -> StageParams:
    h, tp = config.hidden_size, layout.tp
    matmul = (h * config.q_size + 2 * h * config.kv_size + config.q_size * h + 3 * h * config.ffn_hidden_size) // tp
    chunks = layout.pp * layout.virtual_pipeline
    chunk_blocks = config.num_layers // chunks
    first, last = stage == 0, stage == layout.pp - 1
    table = config.vocab_size * h // tp
    # A tied output layer is the embedding itself when one stage holds both; a pipeline keeps a copy.
    tied_here = config.tie_word_embeddings and layout.pp == 1
    return StageParams(
        block=matmul + 2 * h, block_matmul=matmul, blocks=chunk_blocks * layout.virtual_pipeline,
        chunk_blocks=chunk_blocks, embedding=table if first else 0,
        head=(h + (0 if tied_here else table)) if last else 0,
    )


# ---- the pipeline schedule -------------------------------------------------------------------------
def chunks_in_flight(layout: Layout, *, stage: int, microbatches: int | None) -> int:
    """Micro-batch x virtual-stage forwards whose activations rank `stage` holds at once: pp - stage
    under 1F1B; (v-1) pp + 2 (pp - 1 - stage) + 1 under interleaved 1F1B (torch's and Megatron's warm-up
    count plus the one in progress), capped by the micro-batches of the step."""
    pp, vp = layout.pp, layout.virtual_pipeline
    count = pp - stage if vp == 1 else (vp - 1) * pp + 2 * (pp - 1 - stage) + 1
    if microbatches is not None:
        count = min(count, microbatches * vp)
    return max(count, 1)


# ---- the peak ----------------------------------------------------------------------------------------
@dataclass
class _Phase:
    name: str
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, **parts: float) -> _Phase:
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + value
        return self

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _restored(d: Dims, *, mode: str, ac_layers: int, offloaded: bool, compiled: bool = False,
              fp8: bool = False) -> float:
    """Activations a block in backward holds beyond what it kept: what recomputation (or the copy back
    from the host) brings back. full recomputes its whole group when the group's backward starts."""
    whole = block_bytes(d, compiled=compiled, fp8=fp8)
    if mode == "sel":
        return max(whole - block_bytes(d, mode="sel"), 0.0)
    if mode == "full":
        return ac_layers * whole
    return whole if offloaded else 0.0


def stage_memory(config: LlamaConfig, layout: Layout, work: Workload, *, stage: int) -> MemoryEstimate:
    """The peak over one step's phases on pipeline rank `stage`: the loss (last stage), each block's
    backward, the root's reduce-scatter at the end of backward, and the optimizer step."""
    d = _dims(config, layout, work)
    p = stage_params(config, layout, stage=stage)
    mode, k = layout.activation_checkpoint, layout.ac_layers
    last = stage == layout.pp - 1
    shard = layout.shard
    inflight = chunks_in_flight(layout, stage=stage, microbatches=work.microbatches)

    static = {"params": 4 * p.total / shard,
              "optimizer": 0.0 if layout.optimizer_offload == "static" else 8 * p.total / shard}
    grads_all = 4 * p.total / shard
    # With gradient accumulation (or a pipeline's steady state) earlier micro-batches' gradients are
    # resident while this one's activations are.
    held_microbatches = -(-inflight // layout.virtual_pipeline)
    accumulating = work.microbatches is None or work.microbatches > held_microbatches
    # fp8 (parallel/fp8.py) all-gathers the blocks' linears in fp8 where FSDP shards over dp ranks.
    fp8_gather = work.precision == "fp8" and layout.distributed_optimizer and layout.dp > 1
    fp8_bytes = 1 if fp8_gather else d.c
    block_copy = fp8_bytes * p.block_matmul + d.c * (p.block - p.block_matmul)
    root_copy = d.c * p.root
    # The output layer's compute-dtype gradient waits for the root's reduce-scatter at the very end.
    output_layer = p.head + (p.embedding if config.tie_word_embeddings and layout.pp == 1 else 0)
    head_grad = d.c * output_layer if last else 0.0

    n = p.chunk_blocks
    flags = {"compiled": work.compile, "fp8": work.precision == "fp8"}
    offloaded = [mode == "offload" and i < k for i in range(n)]
    kept = [0.0 if off else block_bytes(d, mode=mode, ac_layers=k, **flags) for off in offloaded]
    prefix = [0.0]
    for value in kept:
        prefix.append(prefix[-1] + value)
    io = 2 * d.c * d.h * d.norm_tokens if layout.pp > 1 else 0.0  # a stage's input and output, kept
    others = (inflight - 1) * (prefix[n] + io)  # other micro-batches (chunks) in flight
    work_bytes = backward_work_bytes(d, cp=layout.cp)
    r = layout.reduce_bytes
    # After the reduction: its output shard, and where it is bf16 also the fp32 copy the optimizer reads.
    reduced = (4 + (r if r != 4 else 0)) / shard

    phases = []
    if last:
        loss = loss_path(layout, work)
        _, peak = loss_bytes(d, loss=loss, chunk=work.fused_chunk, logits_kept=work.logits_kept,
                             chunk_fp32=not work.compile or work.chunk_fp32_kept)
        # The last block stays gathered; the fused loss runs inside the root's forward, before FSDP2
        # releases the last all-gather's output buffer.
        copies = root_copy + block_copy * (2 if loss == "fused" else 1)
        if not layout.reshard_after_forward:  # every block of the chunk is still gathered
            copies += block_copy * (n - 1)
        phases.append(_Phase("loss").add(
            **static, grads=grads_all if accumulating else 0.0, param_copies=copies,
            activations=others + prefix[n] + io, loss=final_norm_bytes(d, loss=loss) + peak))
    # Backward of the chunk in progress, block i (the last block first). Between the first and last
    # blocks, and on each side of the offloaded ones, the total is linear in i: its ends suffice.
    for i in sorted({0, 1, k - 1, k, n - 2, n - 1} & set(range(n)), reverse=True):
        done = n - 1 - i
        grads = grads_all if accumulating else 4 * done * p.block / shard
        # Inside block i's backward: its gathered copy and the next one's (prefetched), the previous block's
        # reduce-scatter input (FSDP2 keeps one in flight), activation gradients, recomputed activations.
        # Without resharding after forward, blocks 0..i are all still gathered (nothing to prefetch).
        gathered = (i + 1) if not layout.reshard_after_forward else (2 if i else 1)
        phases.append(_Phase("backward").add(
            **static, grads=grads + head_grad, param_copies=root_copy + block_copy * gathered,
            activations=others + io + prefix[i + 1] + _restored(d, mode=mode, ac_layers=k, offloaded=offloaded[i],
                                                                **flags),
            buffers=work_bytes + (r * p.block if done else 0.0)))
        # Its post-backward (after resharding it): the compute-dtype gradients copied into the reduce-scatter
        # input (fp32, or bf16), then freed before the output is allocated.
        phases.append(_Phase("backward").add(
            **static, grads=grads + head_grad + max(d.c, reduced) * p.block,
            param_copies=root_copy + block_copy * (i if not layout.reshard_after_forward else min(i, 1)),
            activations=others + io + prefix[i],
            buffers=r * p.block))
    if p.root:  # the root's post-backward, the last one: as a block's, with the root's parameters
        block_grads = grads_all if accumulating else grads_all - 4 * p.root / shard
        phases.append(_Phase("end of backward").add(
            **static, grads=block_grads + max(d.c, reduced) * p.root, buffers=r * p.root))
    phases.append(_Phase("optimizer step").add(**static, grads=grads_all))

    top = max(phases, key=lambda phase: phase.total)
    host = 0.0
    if layout.optimizer_offload == "static":
        host += 16 * p.total / shard  # the moments, and pinned copies of each shard and its gradient
    host += inflight * sum(offloaded) * block_bytes(d, **flags)
    return MemoryEstimate(phase=top.name, stage=stage, host=host, **top.parts)


def estimate_memory(config: LlamaConfig, layout: Layout, work: Workload) -> MemoryEstimate:
    """The busiest pipeline rank's peak (with pp = 1 every rank is alike)."""
    stages = [stage_memory(config, layout, work, stage=s) for s in range(layout.pp)]
    return max(stages, key=lambda estimate: estimate.allocated)
