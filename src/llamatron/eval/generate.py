"""Autoregressive text generation with a KV cache: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llamatron.errors import LlamatronError
from llamatron.model import KVCache, Llama


@dataclass(kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 256
    """Upper bound on generated tokens (generation also stops at a stop token)."""
    greedy: bool = False
    """Always take the most likely token; temperature and top_p are then ignored."""
    temperature: float = 0.7
    top_p: float = 0.9
    """Sample from the smallest set of tokens whose probabilities sum to at least top_p."""
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            problems.append(f"--temperature must be > 0 (or use --greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if problems:
            raise LlamatronError("; ".join(problems))


def _next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    """logits: (vocab,) of the last position."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep every token until the cumulative mass before it reaches top_p (the first always stays).
    keep = (sorted_probs.cumsum(0) - sorted_probs) < sampling.top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.inference_mode()
def generate(
    model: Llama,
    prompt_ids: Sequence[int],
    *,
    sampling: SamplingConfig,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate after `prompt_ids` until a stop token or max_new_tokens; returns the new ids, the stop
    token included when one ended generation (as transformers' generate does)."""
    if not prompt_ids:
        raise LlamatronError("the prompt is empty after tokenization; give some text")
    config = model.config
    total = len(prompt_ids) + sampling.max_new_tokens
    if total > config.max_position_embeddings:
        raise LlamatronError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({sampling.max_new_tokens}) exceeds the model's "
            f"{config.max_position_embeddings} positions; shorten the prompt or lower --max-new-tokens"
        )
    param = next(model.parameters())
    cache = KVCache(config, batch_size=1, max_len=total, device=param.device, dtype=param.dtype)
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    tokens = torch.tensor([list(prompt_ids)], device=param.device)
    new_ids: list[int] = []
    stops = set(stop_ids)
    for _ in range(sampling.max_new_tokens):
        logits = model(tokens, kv_cache=cache)[0, -1]
        token = _next_token(logits.cpu(), sampling, generator)
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops:
            break
        tokens = torch.tensor([[token]], device=param.device)
    return new_ids
