"""Batched log-likelihoods of continuations: the forward-pass engine under the multiple-choice tasks
and the lm-eval adapter.

A `Row` is one model input and the continuations scored on it. Continuation j's tokens are predicted
at the row's last len(cont_j) positions; when several continuations are single tokens after the same
context (the four " A".." D" of a CMMLU question), one forward pass scores them all from the logits at
the last position. Rows are sorted by length and right-padded (causal attention never looks right, so
padding changes nothing before it), and the output layer runs only at the positions scored: a full
(batch, seq, 128256) logits tensor would dominate memory and time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llamatron.model import Llama

# Tokens per batch when --batch-size auto; halved on CUDA out-of-memory until a batch fits.
AUTO_TOKENS_GPU = 65536
AUTO_TOKENS_CPU = 4096


@dataclass(frozen=True, kw_only=True)
class Row:
    tokens: list[int]
    continuations: tuple[list[int], ...]
    """Continuation j is predicted at positions len(tokens) - len(cont_j) .. len(tokens) - 1, i.e. tokens
    already holds every continuation token but the last (all single-token continuations share one context)."""


@dataclass(frozen=True, kw_only=True)
class RowScore:
    loglikelihoods: tuple[float, ...]
    greedy: tuple[bool, ...]
    """Whether greedy decoding would produce the continuation (every token the argmax)."""


def row_for_pair(context: list[int], continuation: list[int], *, max_length: int) -> Row:
    """The model input lm-eval builds for one (context, continuation): the pair minus its last token,
    left-truncated to the model's context length."""
    tokens = (context + continuation)[-(max_length + 1):][:-1]
    return Row(tokens=tokens, continuations=(continuation,))


@contextlib.contextmanager
def _without_output_layer(model: Llama) -> Iterator[torch.nn.Module]:
    """Run the model to its final norm only (a model without lm_head returns the hidden state); the
    caller applies the output layer to the positions it needs."""
    head = model.lm_head
    model.lm_head = None
    try:
        yield head
    finally:
        model.lm_head = head


def _batches(order: list[int], rows: Sequence[Row], *, max_batch: int | None, max_tokens: int) -> Iterator[list[int]]:
    """Consecutive groups of the length-sorted rows, bounded by a row count or a padded-token budget."""
    batch: list[int] = []
    for i in order:
        longest = len(rows[batch[0]].tokens) if batch else len(rows[i].tokens)
        full = len(batch) >= max_batch if max_batch else (len(batch) + 1) * longest > max_tokens
        if batch and full:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def _score_batch(model: Llama, rows: list[Row], *, device: torch.device) -> list[RowScore]:
    width = max(len(r.tokens) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)  # (batch, seq), right-padded with id 0
    for b, row in enumerate(rows):
        tokens[b, : len(row.tokens)] = torch.tensor(row.tokens)
    spans = [max(len(c) for c in row.continuations) for row in rows]
    batch_index = torch.cat([torch.full((n,), b) for b, n in enumerate(spans)])
    positions = torch.cat([torch.arange(len(r.tokens) - n, len(r.tokens)) for r, n in zip(rows, spans, strict=True)])
    with _without_output_layer(model) as head:
        hidden = model(tokens.to(device))  # (batch, seq, hidden)
        picked = hidden[batch_index.to(device), positions.to(device)]  # (scored positions, hidden)
        logprobs = torch.log_softmax(head(picked).float(), dim=-1).cpu()  # (scored positions, vocab)
    best = logprobs.argmax(dim=-1)
    scores, start = [], 0
    for row, n in zip(rows, spans, strict=True):
        lls, greedy = [], []
        for cont in row.continuations:
            offset = start + n - len(cont)
            ids = torch.tensor(cont)
            at = torch.arange(offset, offset + len(cont))
            lls.append(float(logprobs[at, ids].sum()))
            greedy.append(bool((best[at] == ids).all()))
        scores.append(RowScore(loglikelihoods=tuple(lls), greedy=tuple(greedy)))
        start += n
    return scores


def score_rows(
    model: Llama,
    rows: Sequence[Row],
    *,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[RowScore]:
    """Scores in the order of `rows`. `batch_size` None picks batches by a token budget (halved on CUDA
    out-of-memory). `on_batch(n)` is told after each batch how many rows it finished (progress)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))  # longest first: OOM shows early
    max_tokens = AUTO_TOKENS_GPU if device.type == "cuda" else AUTO_TOKENS_CPU
    results: list[RowScore | None] = [None] * len(rows)
    done = 0
    while done < len(order):
        try:
            for batch in _batches(order[done:], rows, max_batch=batch_size, max_tokens=max_tokens):
                for i, score in zip(batch, _score_batch(model, [rows[i] for i in batch], device=device), strict=True):
                    results[i] = score
                done += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))
        except torch.cuda.OutOfMemoryError:
            if batch_size is not None or max_tokens <= 256:
                raise
            torch.cuda.empty_cache()
            max_tokens //= 2
    return results  # type: ignore[return-value]
