"""torch.compile of the transformer blocks, one block at a time (torchtitan's apply_compile).

Why per block: every block has the same code and shapes, so one compiled graph serves all of them
(compiled once, reused) and compile time does not grow with depth; FSDP's per-block all-gather and
reshard stay outside the graphs as hooks, where they overlap with compute as in eager mode. What the
compiler buys is fusion of the memory-bound element-wise work between the matmuls (RMSNorm with its fp32
casts, RoPE, SiLU x up, the residual adds), which eager mode runs as a dozen separate kernels per block.

Only each block's `forward` is compiled, not its `__call__`: the hooks that activation checkpointing,
activation offload and FSDP install on the block run eagerly around the compiled forward, so they
compose as in eager mode (a checkpointed region recomputes by calling the same compiled forward).
Parameter names do not change (no `_orig_mod.` wrapper), so checkpoints are the same with and without.

Order (DESIGN section 1): after TP/SP, CP and AC, before FSDP.
"""

from __future__ import annotations

import torch

from llamatron.model.llama import Llama


def apply_compile(
    model: Llama, *, enabled: bool = True, backend: str = "inductor", fullgraph: bool = True, mode: str = "default"
) -> None:
    """Compile each block's forward in place. backend="aot_eager" traces the same graphs without
    generating kernels (tests on CPUs without a C compiler). fullgraph=False lets the compiler split a
    block around what it cannot trace: context parallelism's ring attention exchanges K/V with
    point-to-point sends, so under cp the norms, projections and MLP compile and the ring runs eagerly
    (checked on 2 gloo ranks: fullgraph fails there, fullgraph=False runs). mode: inductor's
    (training.compile_mode); "default" passes none."""
    if not enabled:
        return
    options = {} if mode == "default" else {"mode": mode}
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=fullgraph, **options)
