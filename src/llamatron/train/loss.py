"""Losses as (numerator, denominator) pairs, exact under gradient accumulation and data parallelism.

A step's loss is sum(numerators) / sum(denominators) over every micro-batch of every data-parallel
rank. The denominator depends only on the labels, so the trainer counts it for the whole global batch
first (count_units on each micro-batch, then an all-reduce), and backpropagates numerator / global count
per micro-batch: the gradients are then exactly those of the global-batch loss.

- "token": cross entropy averaged over every labelled token (pretraining; an SFT option).
- "sequence": the seed's SFT loss, each sequence's mean token loss averaged over the sequences of the
  global batch. With packing a "sequence" is each packed sample (document), as Pai-Megatron-Patch
  does: get_batch_on_this_tp_rank_idxmap_sft splits each row at its sample boundaries, divides the loss
  mask of every sample by that sample's count of labelled tokens, and its loss_func returns
  (sum, num_seqs) so Megatron divides by the global number of samples; the padding tail is not a sample.
  A sample with no labelled token is not counted.

Cross entropy runs in fp32 on the logits of the labelled positions only (the masked ones are never
upcast), so an SFT batch of mostly prompt tokens costs little extra memory. Both kinds are a weighted sum
of token losses (token_weights); fused_loss.py computes the same numerator from the hidden state without
materialising the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamatron.parallel.loss_parallel import is_vocab_parallel, vocab_parallel_cross_entropy

IGNORE_INDEX = -100
LOSS_KINDS = ("sequence", "token")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cross entropy of every labelled position, and the mask that selected them.
    logits: (batch, seq, vocab), labels: (batch, seq) pre-shifted. Returns ((n_labelled,), (batch, seq))."""
    mask = labels != IGNORE_INDEX  # (batch, seq)
    if is_vocab_parallel(logits):  # tensor parallelism: each rank holds a slice of the vocabulary
        return vocab_parallel_cross_entropy(logits, labels, mask=mask), mask
    selected = logits[mask].float()  # (n_labelled, vocab)
    return F.cross_entropy(selected, labels[mask], reduction="none"), mask


def pretrain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain token-mean cross entropy (labels already aligned with logits; -100 ignored)."""
    losses, _ = token_losses(logits, labels)
    return losses.mean()


def sequence_ids(labels: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """A batch-wide id per position: the row index, or (row, document) folded into one int. (batch, seq)."""
    batch, seq = labels.shape
    rows = torch.arange(batch, device=labels.device)[:, None].expand(batch, seq)
    if document_ids is None:
        return rows
    # Document ids are < seq within a row (each document holds at least one position).
    return rows * (seq + 1) + document_ids.to(labels.device)


def count_units(labels: torch.Tensor, *, kind: str = "sequence", document_ids: torch.Tensor | None = None) -> int:
    """The denominator of this micro-batch: labelled tokens, or sequences with a labelled token."""
    mask = labels != IGNORE_INDEX
    if kind == "token":
        return int(mask.sum())
    _check_kind(kind)
    return int(torch.unique(sequence_ids(labels, document_ids)[mask]).numel())


def token_weights(
    labels: torch.Tensor, *, kind: str = "sequence", document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each loss kind as a weighted sum of token losses: the labelled positions (batch, seq), every labelled
    token's weight (n_labelled,) fp32 in the order of mask's True entries, and the denominator.
    "token": weight 1, denominator the labelled tokens; "sequence": weight 1 / (its sequence's labelled
    tokens), denominator the sequences with a labelled token."""
    _check_kind(kind)
    mask = labels != IGNORE_INDEX  # (batch, seq)
    if kind == "token":
        weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)[mask]
        return mask, weights, int(weights.numel())
    ids = sequence_ids(labels, document_ids)[mask]  # (n_labelled,)
    unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return mask, 1.0 / counts[inverse].to(torch.float32), int(unique.numel())


@dataclass(frozen=True)
class LabelSelection:
    """A micro-batch's labelled positions and their loss weights (token_weights), worked out from the labels
    on the host before the batch goes to the device. Selecting them on the device (a boolean mask, unique)
    makes the host wait for the GPU in every forward; with the selection copied over, a training step
    queues without waiting (fused_loss.py takes it).
    index: (n_labelled,) int64 into the flattened (batch * seq) positions, ascending; weights: (n_labelled,)
    fp32 in the same order; count: the micro-batch's denominator (count_units)."""

    index: torch.Tensor
    weights: torch.Tensor
    count: int


def label_selection(
    labels: torch.Tensor, *, kind: str = "sequence", document_ids: torch.Tensor | None = None
) -> LabelSelection:
    """The LabelSelection of (batch, seq) pre-shifted labels (on the host: no device waits)."""
    mask, weights, count = token_weights(labels, kind=kind, document_ids=document_ids)
    return LabelSelection(index=mask.flatten().nonzero().squeeze(1), weights=weights, count=count)


def loss_parts(
    logits: torch.Tensor, labels: torch.Tensor, *, kind: str = "sequence", document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """(numerator, denominator) of this micro-batch. kind="token": (sum of token losses, labelled tokens);
    kind="sequence": (sum over sequences of their mean token loss, sequences). The numerator is a 0-dim
    fp32 tensor that carries the gradient."""
    _check_kind(kind)
    if kind == "token":
        losses, _ = token_losses(logits, labels)  # (n_labelled,)
        return losses.sum(), int(losses.numel())
    means = per_sequence_losses(logits, labels, document_ids=document_ids)  # (num_sequences,)
    return means.sum(), int(means.numel())


def per_sequence_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Each sequence's mean token loss, in order of (row, document). (num_sequences,) fp32."""
    losses, mask = token_losses(logits, labels)
    ids = sequence_ids(labels, document_ids)[mask]
    unique, inverse = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=losses.dtype, device=losses.device).index_add_(0, inverse, losses)
    return sums / torch.bincount(inverse, minlength=len(unique)).to(losses.dtype)


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
