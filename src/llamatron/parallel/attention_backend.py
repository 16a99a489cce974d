"""Which SDPA kernel computes attention: the user's choice, carried by the model's attention core
(SDPAttention(backends=...), which applies it with torch.nn.attention.sdpa_kernel inside its forward),
and a start-up probe that names the kernel that actually ran.

The model calls F.scaled_dot_product_attention; PyTorch walks the enabled backends in priority order and
takes the first that accepts the inputs (device, dtype, head dim, mask, GQA). So a choice is a list of
enabled backends in priority order:
- `auto` with `prefer_flash` (the seed's FL=true): every backend, flash first (PyTorch's own order);
- `auto` without it (FL=false): flash left out, cuDNN first (Megatron's fused attention);
- on CUDA, `auto` then times each fused kernel of its list that accepts the job's attention, on the job's
  shape, and moves the fastest to the front (fastest_first);
- a named backend: that one alone, so it runs or the probe fails naming those that would.
Which backend won shows only in the aten op that runs, so the probe runs one attention forward and
backward with the job's shapes and dtype, compiled when the blocks are, under the profiler and reads the
op. (A compiled graph chooses its kernel when it is traced; the choice must be inside the traced code,
which is why the core carries it rather than a context around the training step.)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

from llamatron.errors import LlamatronError
from llamatron.model.llama import SDPAttention

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
_SDP = {
    "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
}
# The fused kernels' aten ops; the math backend decomposes into matmuls and a softmax instead.
_KERNEL_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def backend_order(choice: str, *, prefer_flash: bool = True) -> list[str]:
    """The backends enabled for `choice`, highest priority first."""
    if choice not in ATTENTION_BACKENDS:
        raise LlamatronError(f"parallel.attention_backend={choice!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if choice != "auto":
        return [choice]
    return ["flash", "efficient", "math", "cudnn"] if prefer_flash else ["cudnn", "efficient", "math"]


@dataclass(frozen=True, kw_only=True)
class AttentionShape:
    """One attention call of the job, as one rank sees it."""

    batch: int
    heads: int
    """Query heads on this rank (num_heads / tp)."""
    kv_heads: int
    seq: int
    head_dim: int
    packed: bool
    """Packed samples: a (batch, 1, seq, seq) boolean document mask instead of is_causal."""

    def describe(self) -> str:
        mask = "document mask" if self.packed else "causal"
        return (f"batch {self.batch}, {self.heads} heads / {self.kv_heads} KV heads, seq {self.seq}, "
                f"head dim {self.head_dim}, {mask}")


def sdpa_ops(fn) -> list[str]:
    """The aten SDPA ops (fused kernels and their backward) that one call of fn dispatched, in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name.removeprefix("aten::") for event in prof.events()
            if event.name.startswith("aten::_scaled_dot_product") or event.name.startswith("aten::_flash")]


def _run_attention(order: list[str], shape: AttentionShape, *, device: torch.device, dtype: torch.dtype,
                   compiled: bool, timed_iters: int = 0) -> tuple[str, float | None]:
    """One forward and backward with `shape` through the model's attention core with `order` enabled
    (compiled as the blocks are, if `compiled`); returns the backend whose kernel ran (math if none did)
    and, with timed_iters, the mean seconds of that many more forward+backward passes (CUDA only)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(heads: int) -> torch.Tensor:  # (batch, heads, seq, head_dim)
        return torch.randn(shape.batch, heads, shape.seq, shape.head_dim, device=device, dtype=dtype,
                           generator=gen).requires_grad_()

    q, k, v = rand(shape.heads), rand(shape.kv_heads), rand(shape.kv_heads)
    mask = None
    if shape.packed:
        # Two documents: the mask the model builds from document_ids (causal within each).
        doc = (torch.arange(shape.seq, device=device) >= shape.seq // 2).long()
        causal = torch.ones(shape.seq, shape.seq, dtype=torch.bool, device=device).tril()
        mask = ((doc[:, None] == doc[None, :]) & causal).expand(shape.batch, 1, shape.seq, shape.seq)
    # The model's own attention core, so the probe reports what training runs (it adapts GQA to the mask).
    core = SDPAttention(backends=[_SDP[name] for name in order])
    attend = core.__call__
    if compiled:
        # aot_eager makes the kernel choice exactly where inductor's tracing does, without generating code.
        attend = torch.compile(attend, backend="aot_eager", fullgraph=True)

    def step() -> None:
        attend(q, k, v, mask=mask).float().sum().backward()

    if compiled:
        step()  # traced and compiled here: the profiled call below runs only the compiled graph
    ran = [_KERNEL_OPS[op] for op in sdpa_ops(step) if op in _KERNEL_OPS]
    seconds = None
    if timed_iters and device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(timed_iters):
            step()
        torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / timed_iters
    return (ran[0] if ran else "math"), seconds


def _try(order: list[str], shape: AttentionShape, *, device: torch.device, dtype: torch.dtype,
         compiled: bool = False, timed_iters: int = 0) -> tuple[str | None, str, float | None]:
    """(backend that ran, or None; PyTorch's reasons when none could; seconds per pass if timed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ran, seconds = _run_attention(order, shape, device=device, dtype=dtype, compiled=compiled,
                                          timed_iters=timed_iters)
            return ran, "", seconds
        except RuntimeError as err:
            # PyTorch warns why each enabled backend refused; its error itself only says none was left.
            reasons = [str(w.message).strip() for w in caught if issubclass(w.category, UserWarning)]
            return None, " ".join(dict.fromkeys(reasons)) or f"no enabled kernel accepts these inputs ({err})", None


# Fused kernels within this fraction of the fastest count as tied; the earlier in the order wins, so
# timing noise does not flip a job between kernels from one launch to the next.
_TIE = 0.05
_TIMED_ITERS = 5


def fastest_first(order: list[str], seconds: dict[str, float]) -> list[str]:
    """`order` with the fastest timed backend moved to the front (ties within _TIE keep their order)."""
    if not seconds:
        return order
    best = min(seconds.values())
    winner = next(name for name in order if name in seconds and seconds[name] <= best * (1 + _TIE))
    return [winner] + [name for name in order if name != winner]


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """The choice, its backend order, and what the probe found running."""

    choice: str
    order: tuple[str, ...]
    ran: str
    shape: AttentionShape
    dtype: torch.dtype
    seconds: tuple[tuple[str, float], ...] = ()
    """auto on CUDA: each fused kernel's forward+backward time on the job's shape, as measured."""

    def core(self) -> SDPAttention:
        """The attention core that runs this choice (Llama.set_attention_core)."""
        return SDPAttention(backends=[_SDP[name] for name in self.order])

    def describe(self) -> str:
        timed = ""
        if self.seconds:
            times = ", ".join(f"{name} {1e3 * sec:.2f} ms" for name, sec in self.seconds)
            timed = f"; forward+backward timed: {times}"
        return (f"attention backend: {self.ran} (parallel.attention_backend={self.choice}, enabled in order: "
                f"{', '.join(self.order)}; probed with {self.shape.describe()}, "
                f"{str(self.dtype).removeprefix('torch.')}{timed})")


def select_attention_backend(
    choice: str, *, prefer_flash: bool, shape: AttentionShape, device: torch.device, dtype: torch.dtype,
    compiled: bool = False,
) -> AttentionBackend:
    """Probe `choice` with the job's attention shape (compiled if the blocks are); raise naming the
    backends that work if it cannot run."""
    order = backend_order(choice, prefer_flash=prefer_flash)
    seconds: dict[str, float] = {}
    if choice == "auto" and device.type == "cuda":
        # Which fused kernel is fastest depends on the card, head dim, GQA and the library versions
        # (H200, torch 2.11, cuDNN 9.19: cuDNN 1.6x flash at head dim 64, 1.8x at 128), so auto times each
        # one that accepts the job's attention on its shape and puts the fastest first.
        for name in order:
            if name != "math":
                ran_alone, _, sec = _try([name], shape, device=device, dtype=dtype, timed_iters=_TIMED_ITERS)
                if ran_alone == name and sec is not None:
                    seconds[name] = sec
        order = fastest_first(order, seconds)
    ran, reasons, _ = _try(order, shape, device=device, dtype=dtype, compiled=compiled)
    if ran is None:
        working = [name for name in _SDP if name not in order
                   and _try([name], shape, device=device, dtype=dtype, compiled=compiled)[0] is not None]
        raise LlamatronError(
            f"parallel.attention_backend={choice} cannot run this job's attention on {device.type} ({shape.describe()}, "
            f"{str(dtype).removeprefix('torch.')}): {reasons}; "
            f"backends that can: {', '.join(working) or 'none'} (or auto)"
        )
    return AttentionBackend(choice=choice, order=tuple(order), ran=ran, shape=shape, dtype=dtype,
                            seconds=tuple(sorted(seconds.items(), key=lambda item: item[1])))


def agree_across_ranks(backend: AttentionBackend, *, device: torch.device) -> AttentionBackend:
    """Every rank runs rank 0's timed choice. Each rank times the kernels itself, and on a close call two
    GPUs can time different winners; ranks that run the same attention with different kernels would round
    differently from one another (a tensor- or context-parallel group computes one result between them)."""
    # Decided by the config alone, so every rank takes part in the broadcast or none does.
    if backend.choice != "auto" or not dist.is_initialized() or dist.get_world_size() == 1:
        return backend
    names = list(_SDP)
    first = torch.tensor([names.index(backend.order[0])], device=device)
    dist.broadcast(first, src=0)
    chosen = names[int(first.item())]
    if chosen == backend.order[0]:
        return backend
    # Rank 0 ran `chosen` on the same shape, so it is one of this rank's working kernels too.
    return replace(backend, order=(chosen, *(name for name in backend.order if name != chosen)), ran=chosen)
