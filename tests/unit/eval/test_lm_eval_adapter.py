"""The lm-eval adapter against lm-eval's own HF backend on the same model (SmolLM2-135M, fp32 CPU):
loglikelihood, loglikelihood_rolling (windows forced by a short max_length) and greedy generate_until.
Tolerance: 2e-4 absolute on log-likelihoods; generated text identical."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval (the dev extra)"),
]

LL_REQUESTS = [
    ("天空是什么颜色？答案：", " 蓝色"),
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin, of course"),
    ("Trailing space moves to the continuation ", "here"),
    ("", "An empty context uses the prefix token."),
]
ROLLING = ["Rolling windows: every token is predicted exactly once, with as much context as fits."]
GENERATE = [("The capital of France is", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
            ("1, 2, 3, 4,", {"until": ["\n", "9"], "max_gen_toks": 10})]


def _instances(kind, argument_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(argument_list)]


@pytest.fixture(scope="module")
def models():
    from lm_eval.models.huggingface import HFLM

    from llamatron.checkpoint.bundled import smollm2_hf_dir
    from llamatron.eval.lm_eval_adapter import LlamatronLM

    path = str(smollm2_hf_dir())
    ours = LlamatronLM(pretrained=path, dtype="fp32", device="cpu", max_length=16)
    reference = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=1, max_length=16)
    return ours, reference


def test_registered_under_llamatron():
    from lm_eval.api.registry import get_model

    from llamatron.eval.lm_eval_adapter import LlamatronLM

    assert get_model("llamatron") is LlamatronLM


def test_loglikelihood_matches_hf_backend(models):
    ours, reference = models
    ours._max_length = reference._max_length = 2048  # no truncation here
    try:
        got = ours.loglikelihood(_instances("loglikelihood", LL_REQUESTS))
        want = reference.loglikelihood(_instances("loglikelihood", LL_REQUESTS))
    finally:
        ours._max_length = reference._max_length = 16
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, want, strict=True):
        assert ll == pytest.approx(ref_ll, abs=2e-4)
        assert greedy == ref_greedy


def test_loglikelihood_rolling_matches_hf_backend(models):
    ours, reference = models
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in ROLLING]))
    want = reference.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in ROLLING]))
    assert got == pytest.approx(want, abs=2e-4)


def test_generate_until_matches_hf_backend(models):
    ours, reference = models
    ours._max_length = reference._max_length = 2048
    try:
        got = ours.generate_until(_instances("generate_until", GENERATE))
        want = reference.generate_until(_instances("generate_until", GENERATE))
    finally:
        ours._max_length = reference._max_length = 16
    assert got == want
    assert any(text.strip() for text in got)  # something was generated at all
