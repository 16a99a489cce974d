"""Optimizer offload: which parameters are offloaded, and results equal to the on-device AdamW.

Tolerance: exact (rtol = atol = 0). On a CPU device both paths run torch's foreach AdamW on the same
fp32 values, so the offloaded update must be bit-identical."""

from __future__ import annotations

import pytest
import torch

from llamatron.config.job import OptimSection
from llamatron.errors import LlamatronError
from llamatron.model import build_model
from llamatron.parallel import offload
from llamatron.parallel.offload import OffloadedAdamW, choose_offloaded, offload_optimizer
from llamatron.train.optim import build_optimizer
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_choose_offloaded_keeps_a_prefix_within_budget():
    assert choose_offloaded([10, 20, 30], budget_bytes=0) == [True, True, True]
    assert choose_offloaded([10, 20, 30], budget_bytes=60) == [False, False, False]
    assert choose_offloaded([10, 20, 30], budget_bytes=35) == [False, False, True]
    # Once one does not fit, later small ones are offloaded too (a prefix stays, simple to reason about).
    assert choose_offloaded([10, 50, 5], budget_bytes=20) == [False, True, True]
    assert choose_offloaded([], budget_bytes=5) == []


def _setup(mode: str | None, budget: int | None = None, monkeypatch=None):
    model = build_model(tiny_config(num_layers=2), seed=3)
    optimizer = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.1))
    if mode is not None:
        if budget is not None:
            monkeypatch.setattr(offload, "auto_budget", lambda device, grad_bytes: budget)
        optimizer = offload_optimizer(optimizer, mode=mode, device=CPU)
    return model, optimizer


def _train(model, optimizer, steps: int, *, start: int = 0):
    for step in range(start, start + steps):
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _assert_same(model, optimizer, ref_model, ref_optimizer):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][key], ref_optimizer.state[q][key], rtol=0, atol=0)


@pytest.mark.parametrize(("mode", "budget"), [("static", None), ("auto", None), ("auto", 200_000), ("auto", 10**12)])
def test_offloaded_updates_equal_the_plain_optimizer(mode, budget, monkeypatch):
    ref_model, ref_optimizer = _setup(None)
    model, optimizer = _setup(mode, budget, monkeypatch)
    assert isinstance(optimizer, OffloadedAdamW)
    flags = [optimizer.is_offloaded(p) for g in optimizer.param_groups for p in g["params"]]
    if budget is None:  # static, or auto on a CPU device: everything
        assert all(flags)
    elif budget == 10**12:
        assert not any(flags)
    else:
        assert any(flags) and not all(flags)
    _train(ref_model, ref_optimizer, 4)
    _train(model, optimizer, 4)
    _assert_same(model, optimizer, ref_model, ref_optimizer)


def test_state_dict_round_trip_continues_exactly(monkeypatch):
    ref_model, ref_optimizer = _setup(None)
    _train(ref_model, ref_optimizer, 5)
    model, optimizer = _setup("auto", 200_000, monkeypatch)
    _train(model, optimizer, 3)
    saved_model, saved_optimizer = model.state_dict(), optimizer.state_dict()
    model, optimizer = _setup("auto", 200_000, monkeypatch)
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_optimizer)
    _train(model, optimizer, 2, start=3)
    _assert_same(model, optimizer, ref_model, ref_optimizer)


def test_lr_changes_reach_the_offloaded_update():
    ref_model, ref_optimizer = _setup(None)
    model, optimizer = _setup("static")
    for opt in (ref_optimizer, optimizer):
        for group in opt.param_groups:
            group["lr"] = 3e-3
    _train(ref_model, ref_optimizer, 2)
    _train(model, optimizer, 2)
    _assert_same(model, optimizer, ref_model, ref_optimizer)


def test_none_returns_the_same_optimizer_and_bad_mode_is_refused():
    model = build_model(tiny_config(num_layers=1), seed=3)
    optimizer = build_optimizer(model, OptimSection())
    assert offload_optimizer(optimizer, mode="none", device=CPU) is optimizer
    with pytest.raises(LlamatronError, match="optimizer_offload='gpu'"):
        offload_optimizer(optimizer, mode="gpu", device=CPU)
