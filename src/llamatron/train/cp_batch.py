"""A micro-batch under context parallelism: this cp rank's slice of it, and the slice's share of the loss.

A cp rank sees only part of each row, so it cannot take a sequence's mean token loss (the seed's SFT
loss) by itself. Instead every labelled token gets a weight from the whole row before it is cut:
1 for the token loss, 1 / (labelled tokens of its sequence) for the sequence loss (train/loss.py). A
slice's numerator is sum(weight * token loss) and its count sum(weight); summed over the cp ranks they
are loss_parts' numerator and count of the whole micro-batch (the count exactly for tokens, within
rounding for sequences). The fused output layer + loss (train/fused_loss.py) takes the same weights.
"""

from __future__ import annotations

import torch

from llamatron.parallel.cp import shard_batch
from llamatron.train.loss import token_losses, token_weights


def loss_weights(labels: torch.Tensor, *, kind: str, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, seq) fp32: each labelled token's weight in the loss numerator (train/loss.py's token_weights),
    0 where unlabelled."""
    mask, weights, _ = token_weights(labels, kind=kind, document_ids=document_ids)
    full = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    full[mask] = weights
    return full


def cp_slice(batch: dict[str, torch.Tensor], *, kind: str, cp_rank: int, cp_size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a micro-batch (parallel/cp.py's shard_batch), with `loss_weights` taken
    on the whole rows first."""
    weights = loss_weights(batch["labels"], kind=kind, document_ids=batch.get("document_ids"))
    return shard_batch({**batch, "loss_weights": weights}, cp_rank=cp_rank, cp_size=cp_size)


def slice_loss_parts(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(numerator, count) of a slice from cp_slice: sum(weight * token loss), a 0-dim fp32 tensor that
    carries the gradient, and sum(weight)."""
    losses, mask = token_losses(logits, batch["labels"])  # (n_labelled,), (batch, seq)
    weights = batch["loss_weights"][mask]
    return (losses * weights).sum(), float(weights.sum())
