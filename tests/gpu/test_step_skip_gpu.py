"""On CUDA: the step skipped by the device flag (optim.step_unless), and the compiled two-pass loss chunk.

- fused AdamW with found_inf = 1 leaves parameters, moments and step counts bit-identical, and with 0 steps
  exactly as a plain step (CUDA's fused kernel; the CPU kernel is tested in tests/unit/train/test_optim_skip.py);
- the loss chunk compiled by inductor from _chunk_loss_and_grad_fusable equals the eager in-place function:
  loss to 1e-5 relative, bf16 logit gradients to 1 bf16 ulp of the largest (inductor may reorder the sums).
"""

from __future__ import annotations

import pytest
import torch

from llamatron.config.job import OptimSection
from llamatron.train.optim import build_optimizer, step_unless

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda", generator=g)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g)
    return params


def _snapshot(params, optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for state in optimizer.state.values():
        out += [v.detach().clone() for v in state.values()]
    return out


def test_cuda_fused_adamw_skips_on_the_flag():
    params, reference = _params(0), _params(0)
    model, ref_model = torch.nn.ParameterList(params), torch.nn.ParameterList(reference)
    optimizer = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.1))
    ref_optimizer = build_optimizer(ref_model, OptimSection(lr=1e-2, weight_decay=0.1))
    optimizer.step()
    ref_optimizer.step()
    before = _snapshot(params, optimizer)
    step_unless(optimizer, found_inf=torch.ones((), device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(params, optimizer), strict=True))
    step_unless(optimizer, found_inf=torch.zeros((), device="cuda"))
    ref_optimizer.step()
    for got, want in zip(_snapshot(params, optimizer), _snapshot(reference, ref_optimizer), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inductor_chunk_equals_the_eager_one():
    from llamatron.train.fused_loss import _chunk_loss_and_grad, _compiled_chunk_fn

    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(512, 32000, device="cuda", generator=g) * 3).bfloat16()
    targets = torch.randint(0, 32000, (512,), device="cuda", generator=g)
    weights = torch.rand(512, device="cuda", generator=g)
    loss, grad = _chunk_loss_and_grad(logits, targets, weights, grad=True)
    loss_c, grad_c = _compiled_chunk_fn("inductor")(logits, targets, weights, grad=True)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    ulp = 2.0**-7 * grad.float().abs().max()
    assert (grad_c.float() - grad.float()).abs().max() <= ulp
