"""Compute dtypes per precision setting, and fp16's dynamic loss scaling."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# fp8 multiplies only the blocks' linears in fp8 (parallel/fp8.py); everything else computes in bf16.
_COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype:
    return _COMPUTE[precision]


class LossScaler:
    """Dynamic loss scaling for fp16 (Megatron's defaults: start 2**32, halve on overflow, double
    after 1000 clean steps, floor 1). Disabled it is the identity."""

    def __init__(self, *, enabled: bool, initial: float = 2.0**32, growth_interval: int = 1000) -> None:
        self.enabled = enabled
        self.scale_value = initial if enabled else 1.0
        self.growth_interval = growth_interval
        self._clean_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        for param in params:
            if param.grad is not None:
                param.grad.mul_(1.0 / self.scale_value)

    def update(self, *, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale_value = max(self.scale_value / 2.0, 1.0)
            self._clean_steps = 0
            return
        self._clean_steps += 1
        if self._clean_steps % self.growth_interval == 0:
            self.scale_value *= 2.0
