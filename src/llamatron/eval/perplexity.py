"""Perplexity of a model on a Megatron indexed dataset, the way pretraining sees the data: the .bin's
tokens concatenated (documents end with the EOD preprocessing appended), cut into consecutive windows
of seq_len + 1 tokens that overlap by one (window i predicts tokens i*seq_len+1 .. (i+1)*seq_len), every
token predicted once. Documents are not isolated, as in Megatron's default (no attention-mask reset)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llamatron.data.indexed import IndexedDataset
from llamatron.errors import LlamatronError
from llamatron.model import Llama


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    nll: float
    """Mean negative log-likelihood per predicted token (nats)."""
    perplexity: float
    tokens: int
    """Tokens predicted."""
    windows: int


def window_starts(num_tokens: int, *, seq_len: int, max_windows: int | None = None) -> list[int]:
    """Start offsets of the windows: every one holds at least two tokens (one prediction)."""
    starts = list(range(0, max(num_tokens - 1, 0), seq_len))
    return starts[:max_windows] if max_windows is not None else starts


@torch.inference_mode()
def perplexity(
    model: Llama,
    data_path: str | Path,
    *,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PerplexityResult:
    if seq_len < 1 or batch_size < 1:
        raise LlamatronError(f"--seq-len and --batch-size must be >= 1, got {seq_len} and {batch_size}")
    if seq_len > model.config.max_position_embeddings:
        raise LlamatronError(f"--seq-len {seq_len} exceeds the model's {model.config.max_position_embeddings} "
                             "positions; lower --seq-len")
    tokens = IndexedDataset(data_path).tokens
    starts = window_starts(len(tokens), seq_len=seq_len, max_windows=max_windows)
    if not starts:
        raise LlamatronError(f"{data_path} holds {len(tokens)} tokens; perplexity needs at least 2")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    began, last_log = time.monotonic(), 0.0
    for b in range(0, len(starts), batch_size):
        windows = [torch.from_numpy(tokens[s : s + seq_len + 1].astype("int64")) for s in starts[b : b + batch_size]]
        width = max(len(w) for w in windows)
        batch = torch.zeros(len(windows), width, dtype=torch.long)  # (batch, seq_len + 1)
        targets = torch.full((len(windows), width - 1), -100, dtype=torch.long)  # (batch, seq_len)
        for i, w in enumerate(windows):
            batch[i, : len(w)] = w
            targets[i, : len(w) - 1] = w[1:]
        logits = model(batch[:, :-1].to(device)).float()  # (batch, seq_len, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((targets != -100).sum())
        now = time.monotonic()
        if log is not None and (now - last_log > 10 or b + batch_size >= len(starts)):
            done = min(b + batch_size, len(starts))
            rate = total_tokens / max(now - began, 1e-9)
            eta = (len(starts) - done) * seq_len / max(rate, 1e-9)
            log(f"ppl: {done}/{len(starts)} windows, {rate:,.0f} tok/s, ETA {eta:.0f} s, "
                f"running ppl {math.exp(total_nll / total_tokens):.4f}")
            last_log = now
    mean = total_nll / total_tokens
    return PerplexityResult(nll=mean, perplexity=math.exp(mean), tokens=total_tokens, windows=len(starts))
