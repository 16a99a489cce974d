"""Activation checkpointing and offload change memory, never numbers: one forward/backward of the tiny
model gives the same loss and gradients as the plain model in every mode.

Tolerance: exact (rtol = atol = 0). Recomputation repeats the same CPU kernels on the same inputs, and
offload on a CPU device copies tensors bit for bit, so any difference is a bug."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamatron.errors import LlamatronError
from llamatron.model import build_model
from llamatron.parallel.ac import apply_ac
from tests.conftest import tiny_config

MODES = [("sel", 1), ("full", 1), ("full", 2), ("full", 4), ("offload", 1), ("offload", 3)]


def _model():
    return build_model(tiny_config(num_layers=4), seed=7)


def _batch(packed: bool):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24), generator=gen)
    document_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if packed else None
    return tokens, document_ids


def _loss(model, tokens, document_ids):
    logits = model(tokens[:, :-1], document_ids=None if document_ids is None else document_ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _grads(model, *, packed: bool = False):
    loss = _loss(model, *_batch(packed))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("mode", "layers"), MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_gradients_equal_the_plain_model(mode, layers, packed):
    ref_loss, ref = _grads(_model(), packed=packed)
    model = _model()
    apply_ac(model, mode=mode, layers=layers)
    loss, got = _grads(model, packed=packed)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert got.keys() == ref.keys()  # parameter names unchanged by AC
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


class _SavedCounter:
    """Counts what autograd saves outside any checkpoint/offload region (inner hooks take precedence)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        def pack(t):
            self.count += 1
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _saved_count(model) -> int:
    with _SavedCounter() as counter:
        _loss(model, *_batch(False))
    return counter.count


def test_each_mode_takes_over_what_the_blocks_save():
    plain = _saved_count(_model())
    counts = {}
    for mode, layers in MODES:
        model = _model()
        apply_ac(model, mode=mode, layers=layers)
        counts[(mode, layers)] = _saved_count(model)
    # The same regions for sel and full k=1; larger groups keep fewer group inputs.
    assert counts[("sel", 1)] == counts[("full", 1)]
    assert counts[("full", 4)] < counts[("full", 2)] < counts[("full", 1)] < plain
    per_block = plain - counts[("offload", 1)]
    assert per_block > 0 and counts[("offload", 3)] == plain - 3 * per_block


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.mm += 1
        return func(*args, **(kwargs or {}))


def _backward_matmuls(model) -> int:
    loss = _loss(model, *_batch(False))
    with _CountMatmuls() as counter:
        loss.backward()
    return counter.mm


def test_selective_recomputes_no_matmul_and_full_recomputes_all():
    plain = _backward_matmuls(_model())
    sel, full = _model(), _model()
    apply_ac(sel, mode="sel")
    apply_ac(full, mode="full", layers=2)
    assert _backward_matmuls(sel) == plain
    # 7 projections per block are run again in backward, except each group's last down_proj: nothing
    # backward needs is computed after it, and torch stops recomputing early.
    assert _backward_matmuls(full) == plain + 7 * 4 - 2


def test_no_grad_forward_is_untouched():
    model = _model()
    apply_ac(model, mode="full", layers=2)
    tokens, _ = _batch(False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _model()(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mode", "layers", "message"),
    [("full", 3, "choose ac_layers dividing 4"), ("offload", 5, "use at most 4"), ("full", 0, ">= 1"),
     ("bogus", 1, "not one of")],
)
def test_bad_settings_are_refused(mode, layers, message):
    with pytest.raises(LlamatronError, match=message):
        apply_ac(_model(), mode=mode, layers=layers)
