"""The trainer with activation checkpointing / offload and optimizer offload logs the same losses as the
plain trainer over the 20-iteration tiny-debug job, in one process and over 2 gloo data-parallel ranks.

Tolerance: 1e-6 relative. Recomputation and activation offload repeat the same fp32 CPU kernels on the
same values, and the offloaded AdamW runs the same foreach step on host copies, so the runs are expected
to be bit-identical; the margin only covers summation-order noise a future kernel change might bring.
Each setting is exact on its own in tests/unit/parallel/test_ac*.py; here they run paired (an AC mode with an
optimizer offload mode), through FSDP2 and the CLI, to keep the number of (20 s+) training runs small."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed.test_train_dp import corpus, losses, run_train  # noqa: F401 - corpus is a fixture

FULL_STATIC = ["--parallel.activation_checkpoint=full", "--parallel.ac_layers=2", "--parallel.optimizer_offload=static"]
SEL_AUTO = ["--parallel.activation_checkpoint=sel", "--parallel.optimizer_offload=auto"]
OFFLOAD = ["--parallel.activation_checkpoint=offload", "--parallel.ac_layers=3"]


@pytest.mark.slow
def test_every_mode_matches_the_plain_run_in_one_process(tmp_path, corpus):  # noqa: F811
    plain = losses(run_train(tmp_path / "plain", corpus))
    np.testing.assert_allclose(losses(run_train(tmp_path / "full", corpus, *FULL_STATIC)), plain, rtol=1e-6)
    np.testing.assert_allclose(losses(run_train(tmp_path / "offload", corpus, *OFFLOAD)), plain, rtol=1e-6)
    # Stopped at 10 and resumed: the offloaded optimizer state goes through a DCP checkpoint and back.
    run_train(tmp_path / "sel", corpus, *SEL_AUTO, "--training.exit_interval=10")
    resumed = run_train(tmp_path / "sel", corpus, *SEL_AUTO)
    assert [r["iteration"] for r in resumed] == list(range(1, 21))
    np.testing.assert_allclose(losses(resumed), plain, rtol=1e-6)


@pytest.mark.slow
def test_every_mode_matches_the_plain_run_over_two_ranks(tmp_path, corpus):  # noqa: F811
    plain = losses(run_train(tmp_path / "plain", corpus, nproc=2))
    for name, extra in {"full+static": FULL_STATIC, "sel+auto": SEL_AUTO, "offload": OFFLOAD}.items():
        got = losses(run_train(tmp_path / name, corpus, *extra, nproc=2))
        np.testing.assert_allclose(got, plain, rtol=1e-6, err_msg=name)
