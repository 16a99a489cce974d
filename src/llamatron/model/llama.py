"""A plain single-device LLaMA 3.x decoder. Parallelism is applied from outside (llamatron.parallel).

Parameter names follow HF's LlamaForCausalLM without the `model.` prefix, so a reader who knows HF
knows these: embed_tokens, layers.{i}.self_attn.{q,k,v,o}_proj, layers.{i}.mlp.{gate,up,down}_proj,
layers.{i}.{input,post_attention}_layernorm, norm, lm_head.

A pipeline stage is this same module with some parts set to None: without embed_tokens the input is
already a hidden state; without norm/lm_head the output is the hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamatron.model.config import LlamaConfig
from llamatron.model.kv_cache import KVCache
from llamatron.model.rope import apply_rotary, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """RMSNorm as HF computes it: normalise in fp32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class SDPAttention:
    """The attention core: causal softmax(q k^T / sqrt(head_dim)) v within documents, through
    F.scaled_dot_product_attention. The one replaceable part of the model: context parallelism installs
    ring attention (Llama.set_attention_core), which answers the same two calls.

    backends: the SDPA kernels enabled, highest priority first (parallel/attention_backend.py chooses
    them); None leaves PyTorch's global choice. The choice is applied here, inside the forward, because a
    torch.compile'd block picks its kernel when it is traced and ignores an sdpa_kernel context entered
    outside the compiled code (on an H200 with torch 2.11 a compiled block ran flash under a cuDNN-only
    context); inside the forward the context is traced with the call, so eager and compiled code, and
    activation checkpointing's recompute, run the same kernel."""

    def __init__(self, backends: list[SDPBackend] | None = None) -> None:
        self.backends = backends

    def mask(
        self, document_ids: torch.Tensor | None, *, start: int, seq: int, device: torch.device, cached: bool
    ) -> torch.Tensor | None:
        """What every layer passes to __call__ in this forward: a boolean mask, or None for plain causal."""
        return _attention_mask(document_ids, start=start, seq=seq, device=device, cached=cached)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None) -> torch.Tensor:
        # A full-length causal attention (no mask: no documents, no cache) takes SDPA's is_causal fast path.
        # Plain bools through `if`s, not bool(): under torch.compile's dynamic shapes a shape comparison is a
        # SymBool, which SDPA refuses; branching on it makes dynamo guard on it instead.
        is_causal = enable_gqa = False
        if mask is None and q.shape[2] > 1:
            is_causal = True
        fused_gqa = mask is None and q.dtype in (torch.bfloat16, torch.float16)
        if not fused_gqa and k.shape[1] != q.shape[1]:
            # Only flash takes GQA natively: with a mask or in fp32, enable_gqa sends CUDA to the math kernel
            # (measured 2026-11-28 on an H200), so the other kernels get one K/V head per query head (an exact copy).
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if k.shape[1] != q.shape[1]:
            enable_gqa = True
        if self.backends is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)
        with sdpa_kernel(self.backends, set_priority=len(self.backends) > 1):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.dim_per_head
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.core = SDPAttention()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # (batch, heads, seq, head_dim); -1: under tensor parallelism a rank holds heads / tp of them.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            kv_cache, layer_index = cache
            k, v = kv_cache.update(layer_index, k, v)
        out = self.core(q, k, v, mask=attn_mask)  # (batch, local heads, seq, head_dim)
        out = out.transpose(1, 2).reshape(batch, seq, -1)  # (batch, seq, local heads * head_dim)
        return self.o_proj(out)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, *, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        cache = (kv_cache, self.layer_index) if kv_cache is not None else None
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask=attn_mask, cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens: nn.Embedding | None = nn.Embedding(config.vocab_size, config.hidden_size)
        # A ModuleDict keyed by the global layer index keeps names stable when a pipeline stage
        # drops the layers it does not own.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(config, layer_index=i) for i in range(config.num_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_core = SDPAttention()  # builds the layers' mask once per forward
        self.tie_weights()

    def set_attention_core(self, core: SDPAttention) -> None:
        """Replace the attention core of every layer (parallel/cp.py installs ring attention)."""
        self.attention_core = core
        for layer in self.layers.values():
            layer.self_attn.core = core

    def tie_weights(self) -> None:
        """Share the output layer with the embedding for tied presets (Llama 3.2 1B/3B)."""
        if self.config.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, *, seed: int = 1234) -> None:
        """Deterministic init: N(0, init_std) for inputs to the residual stream's branches, and
        N(0, init_std / sqrt(2 * num_layers)) for the branch outputs (o_proj, down_proj), as Megatron
        scales output layers; RMSNorm weights to one."""
        self.tie_weights()
        std = self.config.init_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, param in sorted(self.named_parameters(), key=lambda item: item[0]):
            generator = torch.Generator(device=param.device).manual_seed(seed + _stable_hash(name))
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, out_std, generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        output_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """tokens: (batch, seq) ids, or (batch, seq, hidden) on a pipeline stage without embeddings.
        positions: (batch, seq) or (seq,), default 0..seq-1 (after the cache's length when decoding).
        document_ids: (batch, seq); attention stays within equal ids (packed samples).
        output_fn(hidden, weight): runs instead of the output layer on the final normed hidden state
        (batch, seq, hidden) and the output layer's weight (vocab, hidden), and its result is returned; a
        fused output layer + loss (train/fused_loss.py) that never materialises the logits runs here, inside
        the model's call, where FSDP has gathered the weight. `lambda hidden, weight: hidden` returns the
        hidden state.
        Returns logits (batch, seq, vocab), or the hidden state on a stage without the output layer."""
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        # Not from h: with sequence parallelism h holds only this rank's part of the sequence, and so does
        # the input of a later pipeline stage; there positions (whole rows) give the length.
        seq = positions.shape[-1] if positions is not None else tokens.shape[1]
        start = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + seq, device=h.device)
        # Recomputed per call (head_dim/2 values): a buffer would follow model.to(bf16) and lose precision.
        inv_freq = rope_inv_freq(self.config, device=h.device)
        cos, sin = rope_cos_sin(inv_freq, positions, dtype=h.dtype)
        attn_mask = self.attention_core.mask(document_ids, start=start, seq=seq, device=h.device,
                                             cached=kv_cache is not None)
        for layer in self.layers.values():
            h = layer(h, cos, sin, attn_mask=attn_mask, kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            if output_fn is not None:
                return output_fn(h, self.lm_head.weight)
            h = self.lm_head(h)
        return h


def _attention_mask(
    document_ids: torch.Tensor | None, *, start: int, seq: int, device: torch.device, cached: bool
) -> torch.Tensor | None:
    """A boolean mask (True = attend), or None where SDPA's is_causal (or no mask) already says it."""
    if document_ids is not None:
        if cached:
            raise ValueError("document_ids (packed samples) cannot be combined with a KV cache")
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (batch, seq, seq)
        return (same_doc & causal)[:, None]  # (batch, 1, seq, seq)
    if not cached or seq == 1:
        return None
    # Queries at start..start+seq-1 against keys 0..start+seq-1.
    query_pos = torch.arange(start, start + seq, device=device)[:, None]
    key_pos = torch.arange(start + seq, device=device)[None, :]
    return key_pos <= query_pos


def _stable_hash(name: str) -> int:
    """A per-parameter seed offset that does not depend on Python's randomised str hash."""
    value = 0
    for char in name.encode():
        value = (value * 131 + char) % 1_000_003
    return value


def build_model(
    config: LlamaConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    seed: int | None = 1234,
) -> Llama:
    """Construct on the meta device (no memory touched), then materialise on `device`.
    With `seed` the weights are initialised; with None they are left empty for a checkpoint to fill."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    if seed is not None:
        model.init_weights(seed=seed)
    return model
