"""A preallocated key/value cache for decoding."""

from __future__ import annotations

import torch

from llamatron.model.config import LlamaConfig


class KVCache:
    """Keys and values of every layer for up to `max_len` positions.

    Layers write their new keys/values at the current length; the model advances the length once
    per forward, after all layers ran."""

    def __init__(
        self, config: LlamaConfig, *, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.dim_per_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (layers, batch, kv_heads, max_len, head_dim)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, kv_heads, new, head_dim) and return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.keys[layer_index, :, :, self.length : end] = k
        self.values[layer_index, :, :, self.length : end] = v
        return self.keys[layer_index, :, :, :end], self.values[layer_index, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps
