"""Activation checkpointing and activation offload on the transformer blocks (the seed's AC knob).

Modes (parallel.activation_checkpoint, with parallel.ac_layers = the seed's MP_AC_LAYERS = k):
- "sel": every block runs under torch's selective activation checkpointing with a per-op policy that
  saves the outputs of matmuls and of the attention kernel and recomputes everything else (RMSNorm,
  RoPE, SiLU, the SwiGLU product, casts, transposes). Why this policy rather than Megatron's "recompute
  the core attention": with flash/cuDNN SDPA the attention core keeps no (seq x seq) scores, so
  recomputing it saves almost nothing while costing a full attention forward; the memory that is left
  is dominated by the element-wise intermediates, which are cheap (memory-bound) to redo. Matmuls, the
  FLOPs, are never redone. k is not used.
- "full": Megatron's uniform method with recompute-num-layers=k: the blocks are cut into consecutive
  groups of k and each group is checkpointed as one unit, so only each group's input is kept and the
  whole group is recomputed in backward. The block count must be a multiple of k (the seed refuses
  otherwise too).
- "offload": what the first k blocks save for backward is copied to pinned CPU memory as it is saved
  and brought back when backward needs it (see _OffloadHooks); the other blocks are untouched.
- "none": nothing.

Everything is installed with forward hooks on the existing blocks, so parameter names (and therefore
checkpoints) are the same with and without AC. The order is fixed (DESIGN section 1): apply_ac runs
after TP/CP and before compile and apply_fsdp; FSDP's own hooks then run inside the checkpointed region,
and in backward a recomputed block unshards its parameters again through them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _checkpoint_without_reentrant_generator,
    create_selective_checkpoint_contexts,
)

from llamatron.errors import LlamatronError
from llamatron.model.llama import Llama

AC_MODES = ("none", "sel", "full", "offload")


def apply_ac(model: Llama, *, mode: str, layers: int = 1) -> None:
    """Install activation checkpointing (`mode` sel | full) or activation offload (offload) on the
    model's blocks; `layers` is the group size for full and the number of leading blocks for offload."""
    blocks = list(model.layers.values())
    _check(mode=mode, layers=layers, num_blocks=len(blocks))
    if mode == "sel":
        for block in blocks:
            _checkpoint_group([block], context_fn=_selective_contexts)
    elif mode == "full":
        for start in range(0, len(blocks), layers):
            _checkpoint_group(blocks[start:start + layers], context_fn=None)
    elif mode == "offload":
        for block in blocks[:layers]:
            _offload_block(block)


def _check(*, mode: str, layers: int, num_blocks: int) -> None:
    if mode not in AC_MODES:
        raise LlamatronError(f"parallel.activation_checkpoint={mode!r} is not one of {', '.join(AC_MODES)}")
    if mode in ("full", "offload") and layers < 1:
        raise LlamatronError(f"parallel.ac_layers must be >= 1 with activation_checkpoint={mode}, got {layers}")
    if mode == "full" and num_blocks % layers:
        raise LlamatronError(
            f"activation_checkpoint=full checkpoints groups of parallel.ac_layers={layers} blocks, but a stage has "
            f"{num_blocks} blocks; choose ac_layers dividing {num_blocks}"
        )
    if mode == "offload" and layers > num_blocks:
        raise LlamatronError(
            f"parallel.ac_layers={layers} blocks to offload, but a stage has {num_blocks}; use at most {num_blocks}"
        )


# ---- selective checkpointing policy ------------------------------------------------------------
def _save_ops() -> frozenset:
    aten = torch.ops.aten
    return frozenset({
        aten.mm.default, aten.addmm.default, aten.bmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    })


def _selective_contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
    save = _save_ops()

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ARG001 - torch's policy signature
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


# ---- a group of consecutive blocks checkpointed as one unit --------------------------------------
@dataclass
class _GroupState:
    hooks_on: bool = True
    generator: Generator[None, None, None] | None = None


def _checkpoint_group(blocks: list[nn.Module], *, context_fn: Callable | None) -> None:
    """Non-reentrant checkpoint from the first block's input to the last block's output.

    The model calls the blocks one by one, so the region is opened in the first block's forward
    pre-hook and closed in the last block's forward hook (as torch.distributed._composable.checkpoint
    does for one module). Recomputation must repeat exactly what ran inside the region (selective
    checkpointing matches ops one by one): the first block's pre-hooks (FSDP's unshard among them) ran
    before the region opened, so it is replayed through its plain `forward`, after unsharding it
    ourselves if FSDP manages it (a no-op when its backward already did); the later blocks ran whole
    inside the region and are replayed through __call__, with our own hooks switched off. Blocks take
    (hidden, cos, sin, **kwargs); the group passes the running hidden state and repeats the rest."""
    state = _GroupState()

    def run_group(hidden: torch.Tensor, *rest: Any, **kwargs: Any) -> torch.Tensor:
        first = blocks[0]
        if isinstance(first, FSDPModule):
            first.unshard()
        hidden = first.forward(hidden, *rest, **kwargs)
        for block in blocks[1:]:
            hidden = block(hidden, *rest, **kwargs)
        return hidden

    @contextmanager
    def hooks_off(inner: AbstractContextManager):
        with inner:
            state.hooks_on = False
            try:
                yield
            finally:
                state.hooks_on = True

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        forward_ctx, recompute_ctx = context_fn() if context_fn is not None else (nullcontext(), nullcontext())
        return forward_ctx, hooks_off(recompute_ctx)

    def open_region(module: nn.Module, args: tuple, kwargs: dict) -> None:  # noqa: ARG001 - hook signature
        # Without grad (evaluation, generation) there is nothing to save, so nothing to checkpoint.
        if not state.hooks_on or not torch.is_grad_enabled():
            return
        state.generator = _checkpoint_without_reentrant_generator(
            run_group, True, contexts, "default", False, True, *args, **kwargs
        )
        next(state.generator)

    def close_region(module: nn.Module, args: tuple, output: Any) -> None:  # noqa: ARG001 - hook signature
        generator, state.generator = state.generator, None
        if generator is None:
            return
        try:
            next(generator)
        except StopIteration:
            return
        raise AssertionError("checkpoint region did not close")

    blocks[0].register_forward_pre_hook(open_region, with_kwargs=True)
    blocks[-1].register_forward_hook(close_region, always_call=True)


# ---- activation offload --------------------------------------------------------------------------
class _OffloadHooks:
    """saved_tensors_hooks for one block: pack copies a saved activation to pinned host memory on a
    side CUDA stream (overlapping the block's compute), unpack copies it back on the compute stream.

    Parameters (their storage) are never offloaded: they stay resident anyway, and FSDP refills their
    storage in backward. On a CPU device the "offload" is a plain copy, which keeps this path tested."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.stream: torch.cuda.Stream | None = None
        self.param_storages: set[int] | None = None

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        if self.param_storages is None:
            # Computed inside forward, after FSDP registered the unsharded parameters on the block.
            self.param_storages = {p.untyped_storage().data_ptr() for p in self.block.parameters()}
        return tensor.untyped_storage().data_ptr() in self.param_storages

    def pack(self, tensor: torch.Tensor) -> Any:
        if self._is_parameter(tensor):
            return ("resident", tensor)
        if tensor.device.type != "cuda":
            return ("copied", tensor.detach().clone())
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensor.device)
        compute = torch.cuda.current_stream(tensor.device)
        # The side stream must see the finished activation before copying it out.
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # The caching allocator must not hand the activation's memory to a later kernel before the
        # copy has read it; record_stream defers the reuse until the side stream passes this point.
        tensor.record_stream(self.stream)
        return ("offloaded", (tensor.device, host, done))

    def unpack(self, packed: Any) -> torch.Tensor:
        kind, payload = packed
        if kind != "offloaded":
            return payload
        device, host, done = payload
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        # From pinned memory the copy is asynchronous; the host allocator keeps `host` alive until it ends.
        return host.to(device, non_blocking=True)


def _offload_block(block: nn.Module) -> None:
    hooks = _OffloadHooks(block)
    active: list[AbstractContextManager] = []

    def enter(module: nn.Module, args: tuple) -> None:  # noqa: ARG001 - hook signature
        if not torch.is_grad_enabled():
            return
        hooks.param_storages = None
        ctx = torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)
        ctx.__enter__()
        active.append(ctx)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:  # noqa: ARG001 - hook signature
        if active:
            active.pop().__exit__(None, None, None)

    block.register_forward_pre_hook(enter)
    block.register_forward_hook(leave, always_call=True)
