"""A micro-batch's loss under context parallelism: the cp slices' (numerator, count) add up to the whole
micro-batch's loss_parts, for the token and the sequence (packed SFT) loss, and so do the gradients.
Tolerance: fp32, sums in another order: 1e-6 relative."""

from __future__ import annotations

import pytest
import torch

from llamatron.train.cp_batch import cp_slice, loss_weights, slice_loss_parts
from llamatron.train.loss import loss_parts


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (2, 16), generator=generator)
    labels[0, :5] = -100  # a prompt
    labels[1, 12:] = -100  # padding
    document_ids = torch.tensor([[0] * 7 + [1] * 6 + [2] * 3, [0] * 12 + [1] * 4])
    positions = torch.cat([torch.arange(7), torch.arange(6), torch.arange(3)])[None].expand(2, 16)
    return {"tokens": torch.zeros(2, 16, dtype=torch.long), "labels": labels, "document_ids": document_ids,
            "positions": positions}


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("cp", [2, 4])
def test_slices_add_up_to_the_whole_micro_batch(kind, cp):
    batch = _batch()
    logits = torch.randn(2, 16, 11, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want_num, want_count = loss_parts(logits, batch["labels"], kind=kind, document_ids=batch["document_ids"])
    (want_grad,) = torch.autograd.grad(want_num, logits)
    numerator, count = torch.zeros(()), 0.0
    for rank in range(cp):
        part = cp_slice({**batch, "logits": logits}, kind=kind, cp_rank=rank, cp_size=cp)
        num, cnt = slice_loss_parts(part["logits"], part)
        numerator, count = numerator + num, count + cnt
    (grad,) = torch.autograd.grad(numerator, logits)
    torch.testing.assert_close(numerator, want_num, rtol=1e-6, atol=0)
    assert count == pytest.approx(want_count, rel=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-8)


def test_sequence_weights_are_one_over_the_labelled_tokens_of_each_document():
    batch = _batch()
    weights = loss_weights(batch["labels"], kind="sequence", document_ids=batch["document_ids"])
    assert torch.allclose(weights[0, 5:7], torch.full((2,), 1 / 2))  # document 0 of row 0: 2 labelled tokens
    assert torch.allclose(weights[0, 7:13], torch.full((6,), 1 / 6))
    assert torch.allclose(weights[1, :12], torch.full((12,), 1 / 12))
    assert (weights[0, :5] == 0).all() and (weights[1, 12:] == 0).all()
