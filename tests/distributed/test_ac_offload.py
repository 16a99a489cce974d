"""The trainer with activation checkpointing / offload and optimizer offload logs the same losses as the
plain trainer over the 20-iteration tiny-debug job, in one process and over 2 gloo data-parallel ranks.

Tolerance: 1e-6 relative. Recomputation and activation offload repeat the same fp32 CPU kernels on the
same values, and the offloaded AdamW runs the same foreach step on host copies, so the runs are expected
to be bit-identical; the margin only covers summation-order noise a future kernel change might bring.
Each setting is exact on its own in tests/unit/parallel/test_ac*.py; here they run combined, through
FSDP2 and the CLI, to keep the number of (20 s+) training runs small."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed.test_train_dp import corpus, losses, run_train  # noqa: F401 - corpus is a fixture

FULL_STATIC = ["--parallel.activation_checkpoint=full", "--parallel.ac_layers=2", "--parallel.optimizer_offload=static"]
MORE = {
    "sel+auto": ["--parallel.activation_checkpoint=sel", "--parallel.optimizer_offload=auto"],
    "offload-k3": ["--parallel.activation_checkpoint=offload", "--parallel.ac_layers=3"],
}


@pytest.mark.slow
def test_full_ac_with_optimizer_offload_matches_the_plain_run(tmp_path, corpus):  # noqa: F811
    plain = losses(run_train(tmp_path / "plain", corpus))
    got = losses(run_train(tmp_path / "full+static", corpus, *FULL_STATIC))
    np.testing.assert_allclose(got, plain, rtol=1e-6)


@pytest.mark.slow
def test_every_mode_matches_the_plain_run_in_one_process(tmp_path, corpus):  # noqa: F811
    plain = losses(run_train(tmp_path / "plain", corpus))
    for name, extra in MORE.items():
        np.testing.assert_allclose(losses(run_train(tmp_path / name, corpus, *extra)), plain, rtol=1e-6,
                                   err_msg=name)


@pytest.mark.slow
def test_every_mode_matches_the_plain_run_over_two_ranks(tmp_path, corpus):  # noqa: F811
    plain = losses(run_train(tmp_path / "plain", corpus, nproc=2))
    for name, extra in {"full+static": FULL_STATIC, **MORE}.items():
        got = losses(run_train(tmp_path / name, corpus, *extra, nproc=2))
        np.testing.assert_allclose(got, plain, rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_resume_with_optimizer_offload_equals_straight_run(tmp_path, corpus):  # noqa: F811
    extra = ["--parallel.activation_checkpoint=sel", "--parallel.optimizer_offload=static"]
    straight = losses(run_train(tmp_path / "straight", corpus, *extra))
    run_train(tmp_path / "resumed", corpus, *extra, "--training.exit_interval=10")
    assert losses(run_train(tmp_path / "resumed", corpus, *extra)) == straight
