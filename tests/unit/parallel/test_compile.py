"""Compiled blocks (parallel/compile.py) against eager: a few AdamW steps of the tiny model give the same
losses, alone and under each activation checkpointing mode (whose hooks run around the compiled forward).

Backend aot_eager: it traces and partitions the same forward/backward graphs as inductor but runs them
with aten kernels, so these tests check the tracing, graph reuse and hook composition in seconds.
Inductor itself runs on this CPU too (gcc), but compiling one block takes minutes on 2 shared cores
(measured 220 s wall; losses equal eager to 5e-7 relative), too long for the suite; it is exercised on GPU by
bench/train_bench.py --compile. Tolerance: 1e-6 relative on the losses (aot_eager runs the same kernels in
the same order: measured exactly equal).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from llamatron.model import build_model
from llamatron.parallel.ac import apply_ac
from llamatron.parallel.compile import apply_compile
from llamatron.train.loss import loss_parts
from tests.conftest import tiny_config

REL_TOL = 1e-6


def _train(model, *, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
        labels = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
        numerator, count = loss_parts(model(tokens), labels, kind="token")
        (numerator / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(numerator.detach()) / count)
    return losses


@pytest.mark.parametrize("ac", ["none", "sel", "full", "offload"])
def test_compiled_blocks_train_like_eager(ac):
    config = tiny_config(num_layers=4)
    eager = build_model(config, seed=1)
    compiled = build_model(config, seed=1)
    for model in (eager, compiled):
        apply_ac(model, mode=ac, layers=2)
    apply_compile(compiled, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    want, got = _train(eager), _train(compiled)
    torch.testing.assert_close(got, want, rtol=REL_TOL, atol=0)
    # One graph serves every block (same code, same shapes): compile time does not grow with depth.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_disabled_is_a_no_op():
    model = build_model(tiny_config(), seed=1)
    apply_compile(model, enabled=False)
    assert all("forward" not in vars(block) for block in model.layers.values())


def test_a_new_sequence_length_recompiles_with_dynamic_shapes():
    """Batches of varying length (SFT padded to the longest sample) make dynamo recompile the block with a
    symbolic sequence length; attention's is_causal must still reach SDPA as a plain bool (a CI failure:
    "argument 'is_causal' must be bool, not SymBool"). Same tolerance as above."""
    config = tiny_config(num_layers=2)
    eager = build_model(config, seed=1)
    compiled = build_model(config, seed=1)
    apply_compile(compiled, backend="aot_eager")
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    for seq in (16, 24, 40):
        tokens = torch.randint(0, config.vocab_size, (2, seq), generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(compiled(tokens), eager(tokens), rtol=REL_TOL, atol=1e-6)


def test_the_compile_mode_reaches_inductor(monkeypatch):
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    apply_compile(build_model(tiny_config(num_layers=2), seed=1), mode="max-autotune-no-cudagraphs")
    apply_compile(build_model(tiny_config(num_layers=2), seed=1))
    assert [k.get("mode") for k in seen] == ["max-autotune-no-cudagraphs"] * 2 + [None] * 2
    assert all(k["backend"] == "inductor" for k in seen)


def test_a_compile_mode_without_compile_is_refused():
    from llamatron.config.load import load_config
    from llamatron.errors import LlamatronError

    config = load_config("tiny-debug", ["--data.data_path=x", "--training.compile_mode=max-autotune-no-cudagraphs"])
    with pytest.raises(LlamatronError, match="compile_mode=max-autotune-no-cudagraphs applies with training.compile=true"):
        config.validate()
