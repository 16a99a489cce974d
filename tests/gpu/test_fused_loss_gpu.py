"""The fused output layer + loss on CUDA in bf16, where dW is accumulated over chunks inside the matmul
(addmm with an fp32 out_dtype), against the same computation in fp64 on the same inputs.

Tolerance: the fused path rounds each chunk's logits and logit gradients to bf16 as the plain path does;
against fp64 the loss agrees to 1e-3 relative and dW / dh to 1e-2 of their largest element (bf16's
rounding, 2^-8, on sums of many terms); the fp32 accumulation is what keeps dW there over many chunks.
"""

from __future__ import annotations

import pytest
import torch

from llamatron.train.fused_loss import fused_loss_parts
from llamatron.train.loss import IGNORE_INDEX, loss_parts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_chunks_accumulate_dw_in_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, vocab = 4096, 256, 5000
    h = torch.randn(1, tokens, hidden, device="cuda", generator=g)
    w = torch.randn(vocab, hidden, device="cuda", generator=g) * 0.05
    labels = torch.randint(0, vocab, (1, tokens), device="cuda", generator=g)
    labels[torch.rand(1, tokens, device="cuda", generator=g) < 0.2] = IGNORE_INDEX

    def grads(fn, dtype):
        hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        num, den = fn(hh, ww, labels)
        (num / den).backward()
        return (num / den).double(), hh.grad.double(), ww.grad.double()

    def plain(hh, ww, labels):
        return loss_parts(hh @ ww.t(), labels, kind="token")

    def fused(hh, ww, labels):
        return fused_loss_parts(hh, ww, labels, kind="token", chunk_size=256)  # 16 chunks

    loss_ref, dh_ref, dw_ref = grads(plain, torch.float64)
    loss, dh, dw = grads(fused, torch.bfloat16)
    assert abs(float(loss - loss_ref)) <= 1e-3 * abs(float(loss_ref))
    for name, got, ref in (("dh", dh, dh_ref), ("dw", dw, dw_ref)):
        err, scale = float((got - ref).abs().max()), float(ref.abs().max())
        assert err <= 1e-2 * scale, f"{name}: max error {err:.3g} vs largest element {scale:.3g}"
