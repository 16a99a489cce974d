"""The fused (chunked) output layer + cross entropy against the plain path: logits, then loss.loss_parts.

Tolerances: in fp32 the two compute the same sums in a different order (chunked matmuls, fp32 dW
accumulated over chunks, per-token weights instead of per-sequence means), so the loss agrees to 1e-6
relative and every gradient to 1e-6 of its largest element (elementwise relative error is meaningless for
elements that cancel to near zero; measured: up to 4.3e-7). In bf16 both round the logit gradients to bf16, at different
points (before / after the scale), so gradients agree to bf16 rounding (1e-2 of the largest element),
the loss to 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from llamatron.model import build_model
from llamatron.train.fused_loss import default_chunk_size, fused_loss_parts
from llamatron.train.loss import IGNORE_INDEX, label_selection, loss_parts
from tests.conftest import tiny_config

REL_TOL = 1e-6


def _batch(seed: int, *, batch=3, seq=20, hidden=16, vocab=37, masked=0.4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < masked] = IGNORE_INDEX
    documents = torch.tensor([[0] * 7 + [1] * 8 + [2] * 5, [0] * 20, [0] * 3 + [1] * 17])
    return h, w, labels, documents


def assert_grad_close(actual, expected, tol=REL_TOL, msg=""):
    """max |actual - expected| <= tol * max |expected|."""
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= tol * scale, f"{msg} max error {err:.3g} vs largest element {scale:.3g} (tolerance {tol:g})"


def _plain(h, w, labels, **kwargs):
    return loss_parts(h @ w.t(), labels, **kwargs)


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("chunk_size", [7, 64])  # several chunks, the last one short; one chunk
@pytest.mark.parametrize("with_documents", [False, True])
def test_loss_and_grads_equal_plain_path(kind, chunk_size, with_documents):
    h, w, labels, documents = _batch(0)
    docs = documents if with_documents else None
    results = []
    for fn in (_plain, partial(fused_loss_parts, chunk_size=chunk_size)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        num, den = fn(hh, ww, labels, kind=kind, document_ids=docs)
        (num * 0.37).backward()  # a scale, as the trainer's 1 / global count
        results.append((num.detach(), den, hh.grad, ww.grad))
    (num_p, den_p, gh_p, gw_p), (num_f, den_f, gh_f, gw_f) = results
    assert den_f == den_p
    torch.testing.assert_close(num_f, num_p, rtol=REL_TOL, atol=0)
    assert_grad_close(gh_f, gh_p)
    assert_grad_close(gw_f, gw_p)
    # Masked positions get no gradient.
    assert gh_f[labels == IGNORE_INDEX].abs().max() == 0


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("with_documents", [False, True])
def test_host_selection_equals_the_mask_on_the_device(kind, with_documents):
    """The labelled rows gathered by a host-made index (what the trainer sends, so no step waits for the
    device) give the same loss, count and gradients as the boolean mask, to the last bit: same rows, same
    order, same weights."""
    h, w, labels, documents = _batch(3)
    docs = documents if with_documents else None
    results = []
    for selection in (None, label_selection(labels, kind=kind, document_ids=docs)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        num, den = fused_loss_parts(hh, ww, labels, kind=kind, document_ids=docs, selection=selection, chunk_size=7)
        (num * 0.37).backward()
        results.append((num.detach(), den, hh.grad, ww.grad))
    (num_m, den_m, gh_m, gw_m), (num_s, den_s, gh_s, gw_s) = results
    assert den_s == den_m
    assert torch.equal(num_s, num_m)
    assert torch.equal(gh_s, gh_m) and torch.equal(gw_s, gw_m)


def test_selection_and_loss_weights_are_exclusive():
    h, w, labels, _ = _batch(4)
    with pytest.raises(ValueError, match="not both"):
        fused_loss_parts(h, w, labels, loss_weights=torch.ones(labels.shape), selection=label_selection(labels))


def test_no_grad_gives_the_loss_alone():
    h, w, labels, documents = _batch(1)
    with torch.no_grad():
        num_f, den_f = fused_loss_parts(h, w, labels, kind="sequence", document_ids=documents, chunk_size=5)
        num_p, den_p = _plain(h, w, labels, kind="sequence", document_ids=documents)
    assert den_f == den_p and not num_f.requires_grad
    torch.testing.assert_close(num_f, num_p, rtol=REL_TOL, atol=0)


def test_no_labelled_token():
    h, w, labels, _ = _batch(2)
    labels[:] = IGNORE_INDEX
    hh = h.clone().requires_grad_()
    num, den = fused_loss_parts(hh, w, labels, kind="token")
    num.backward()
    assert den == 0 and float(num.detach()) == 0.0 and hh.grad.abs().max() == 0


@pytest.mark.parametrize("tied", [False, True])
def test_through_the_model_call(tied):
    """model(..., output_fn=fused) against loss_parts(model(...)): every parameter's gradient."""
    config = tiny_config(tie_word_embeddings=tied)
    model = build_model(config, seed=3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, config.vocab_size, (2, 16), generator=g)
    labels[:, :5] = IGNORE_INDEX
    grads = []
    for fused in (False, True):
        model.zero_grad()
        if fused:
            num, den = model(tokens, output_fn=partial(fused_loss_parts, labels=labels, kind="token", chunk_size=9))
        else:
            num, den = loss_parts(model(tokens), labels, kind="token")
        (num / den).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_grad_close(grads[1][name], grads[0][name], msg=name)


def test_bf16_matches_plain_path_to_rounding():
    h, w, labels, documents = _batch(3, hidden=32, vocab=301)
    h, w = h.bfloat16(), w.bfloat16()
    results = []
    for fn in (_plain, partial(fused_loss_parts, chunk_size=16)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        num, _ = fn(hh, ww, labels, kind="sequence", document_ids=documents)
        num.backward()
        assert hh.grad.dtype == ww.grad.dtype == torch.bfloat16 and num.dtype == torch.float32
        results.append((num.detach(), hh.grad.float(), ww.grad.float()))
    (num_p, gh_p, gw_p), (num_f, gh_f, gw_f) = results
    torch.testing.assert_close(num_f, num_p, rtol=1e-5, atol=0)
    assert_grad_close(gh_f, gh_p, tol=1e-2)
    assert_grad_close(gw_f, gw_p, tol=1e-2)


def test_default_chunk_size():
    assert default_chunk_size(128256) == 2048
    assert default_chunk_size(256) == 16384
    assert default_chunk_size(10_000_000) == 256


@pytest.mark.slow
def test_under_fsdp_on_two_gloo_ranks():
    """FSDP2 gathers lm_head's weight for the fused loss inside the model call: 2 ranks with gradient
    accumulation against the plain loss in one process (tests/unit/train/fused_loss_fsdp_check.py)."""
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.unit.train.fused_loss_fsdp_check"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_compiled_chunk_function():
    """The per-chunk loss and gradient under torch.compile (aot_eager: the same traced graph, aten
    kernels) equal the eager ones; chunks of 7 leave a shorter last chunk (a dynamic length)."""
    h, w, labels, documents = _batch(4)
    results = []
    for backend in (None, "aot_eager"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        num, _ = fused_loss_parts(hh, ww, labels, kind="sequence", document_ids=documents, chunk_size=7,
                                  compile_backend=backend)
        num.backward()
        results.append((num.detach(), hh.grad, ww.grad))
    (num_e, gh_e, gw_e), (num_c, gh_c, gw_c) = results
    torch.testing.assert_close(num_c, num_e, rtol=REL_TOL, atol=0)
    assert_grad_close(gh_c, gh_e)
    assert_grad_close(gw_c, gw_e)


def test_given_token_weights():
    """Precomputed per-token weights (context parallelism's slices): sum(w * loss) and sum(w)."""
    h, w, labels, _ = _batch(5)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    num, den = fused_loss_parts(h, w, labels, loss_weights=weights, chunk_size=6)
    mask = labels != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy((h @ w.t())[mask], labels[mask], reduction="none")
    torch.testing.assert_close(num, (losses * weights[mask]).sum(), rtol=REL_TOL, atol=0)
    assert den == pytest.approx(float(weights[mask].sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiler_friendly_chunk_function_equals_the_in_place_one(dtype):
    """The function compile runs (no in-place (C, vocab) buffer, the one-hot as a comparison) against the
    eager in-place one on the same chunk: the loss to 1e-6 relative, the logit gradients to one rounding
    of their dtype (the one-hot is subtracted before, not after, the weight is applied)."""
    from llamatron.train.fused_loss import _chunk_loss_and_grad, _chunk_loss_and_grad_fusable

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 301, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 301, (9,), generator=g)
    weights = torch.rand(9, generator=g)
    loss, grad = _chunk_loss_and_grad(logits, targets, weights, grad=True)
    loss_f, grad_f = _chunk_loss_and_grad_fusable(logits, targets, weights, grad=True)
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=0)
    assert grad_f.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad_f.float(), grad.float(), rtol=eps, atol=eps * float(weights.max()) * 1e-2)
    loss_only, none = _chunk_loss_and_grad_fusable(logits, targets, weights, grad=False)
    assert none is None and torch.equal(loss_only, loss_f)
