"""Vocabulary-parallel cross entropy: the loss from logits sharded on the vocabulary, without gathering them.

Each tensor-parallel rank holds logits for a contiguous 1/tp of the vocabulary. Cross entropy
needs only three numbers per position from the whole vocabulary: the maximum (for a stable
log-sum-exp), the sum of exponentials, and the target's logit; each is one all-reduce of a
(positions,) vector, instead of an all-gather of (positions, vocab). The gradient, softmax minus the
one-hot target, is computed locally on each rank's slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def is_vocab_parallel(logits: torch.Tensor) -> bool:
    """True for logits that apply_tp(..., loss_parallel=True) returned: a DTensor sharded on the last dim."""
    if not isinstance(logits, DTensor):
        return False
    placement = logits.placements[0]
    return isinstance(placement, Shard) and placement.dim in (-1, logits.ndim - 1)


def vocab_parallel_cross_entropy(logits: DTensor, labels: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
    """fp32 cross entropy of the positions where `mask` is true.
    logits: DTensor (batch, seq, vocab) sharded on vocab over a 1-D mesh; labels, mask: (batch, seq).
    Returns (n_labelled,), the same values as F.cross_entropy on the gathered logits."""
    assert is_vocab_parallel(logits) and logits.device_mesh.ndim == 1, logits.placements
    mesh = logits.device_mesh
    local = logits.to_local()  # (batch, seq, vocab / tp)
    # Shards are contiguous and equal (the vocabulary divides by tp), rank r holding [r*V/tp, (r+1)*V/tp).
    vocab_start = mesh.get_local_rank() * local.shape[-1]
    selected = local[mask].float()  # (n_labelled, vocab / tp)
    return _VocabParallelCrossEntropy.apply(selected, labels[mask], vocab_start, mesh.get_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        # logits: (n, vocab_local) fp32, target: (n,) global ids.
        row_max = logits.max(dim=-1).values  # (n,)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]  # (n, vocab_local)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)  # (n,)
        local_target = target - vocab_start
        owned = (local_target >= 0) & (local_target < logits.shape[-1])  # (n,) this rank holds the target
        index = torch.where(owned, local_target, 0)
        target_logit = shifted.gather(-1, index[:, None]).squeeze(-1) * owned  # (n,)
        # One collective for both sums: (2, n).
        sums = torch.stack([sum_exp, target_logit])
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums[0], sums[1]
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), index, owned)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, index, owned = ctx.saved_tensors  # (n, vocab_local), (n,), (n,)
        grad = softmax * grad_loss[:, None]
        # d loss / d logit_target = softmax - 1, only on the rank holding the target.
        grad.scatter_add_(-1, index[:, None], (-grad_loss * owned)[:, None])
        return grad, None, None, None
