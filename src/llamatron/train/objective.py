"""The training objective as (numerator, count) pairs, so the trainer can divide by the count of the
whole global batch (across micro-batches and data-parallel ranks) and get exact gradients.

- token_mean: mean cross entropy over every labelled token (pretraining; SFT option).
- sequence_mean: the seed's SFT loss, the mean over sequences of each sequence's mean token loss; a
  packed row holds several sequences, told apart by document_ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _sequence_ids(labels: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """A batch-unique id per sequence for every position: (batch, seq)."""
    batch, seq = labels.shape
    row = torch.arange(batch, device=labels.device)[:, None].expand(batch, seq)
    if document_ids is None:
        return row
    # Documents are numbered within a row; offset them by row so ids never collide across rows.
    span = int(document_ids.max().item()) + 1 if document_ids.numel() else 1
    return row * span + document_ids


def loss_terms(
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kind: str,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | float, float]:
    """Returns (sum of the per-unit losses, number of units) for this micro-batch; units are tokens
    (token_mean) or sequences with at least one labelled token (sequence_mean). With logits=None only
    the count is computed (the trainer needs the global count before any forward)."""
    valid = labels != IGNORE_INDEX  # (batch, seq)
    if kind == "token_mean":
        count = float(valid.sum())
        if logits is None:
            return 0.0, count
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return token_loss, count
    if kind != "sequence_mean":
        raise ValueError(f"unknown loss kind {kind!r}")
    seq_ids = _sequence_ids(labels, document_ids)[valid]  # (n_valid,)
    unique_ids, inverse = torch.unique(seq_ids, return_inverse=True)
    count = float(unique_ids.numel())
    if logits is None:
        return 0.0, count
    token_loss = F.cross_entropy(logits.float()[valid], labels[valid], reduction="none")  # (n_valid,)
    per_seq_sum = torch.zeros(unique_ids.numel(), device=token_loss.device).index_add_(0, inverse, token_loss)
    per_seq_len = torch.zeros(unique_ids.numel(), device=token_loss.device).index_add_(
        0, inverse, torch.ones_like(token_loss)
    )
    return (per_seq_sum / per_seq_len).sum(), count
