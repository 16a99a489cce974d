"""AdamW with the seed's settings and Megatron's learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llamatron.config.job import OptimSection


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never norms or biases (every 1-D parameter), as Megatron does."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim: OptimSection, *, fused: bool = True) -> torch.optim.AdamW:
    # fused=True runs the whole update as a few kernels (CUDA and CPU alike), and only the fused kernel can
    # skip a step on a device flag (step_unless); foreach is kept for comparison.
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, weight_decay=optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **kwargs,
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step_unless applies: torch's own fused AdamW, whose kernel reads a found_inf flag on the
    device (the optimizer-offload subclass steps part of the model on the host and does not)."""
    return type(optimizer) is torch.optim.AdamW and bool(optimizer.defaults.get("fused"))


def step_unless(optimizer: torch.optim.AdamW, *, found_inf: torch.Tensor) -> None:
    """optimizer.step(), skipped by the kernel where found_inf (a 0-dim fp32 device tensor) is 1:
    parameters, moments and step counts stay as they were. The flag is handed over as torch.amp.GradScaler
    does (the optimizer attribute Adam.step reads), so the host never waits to decide."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass(kw_only=True, frozen=True)
class LRSchedule:
    """Megatron's OptimizerParamScheduler: linear warmup from 0, then decay to min_lr over
    (decay_iters - warmup_iters) steps, then min_lr. `lr_at(step)` takes the count of finished steps,
    so optimizer step number i (1-based) runs with lr_at(i - 1), exactly as Megatron."""

    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    def lr_at(self, step: int) -> float:
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if step > self.decay_iters:
            return self.min_lr
        span = self.decay_iters - self.warmup_iters
        ratio = (step - self.warmup_iters) / span if span > 0 else 1.0
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
