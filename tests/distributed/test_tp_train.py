"""The trainer under tensor parallelism (gloo, 2 and 4 processes) against one process, for pretraining
and packed SFT; checkpoints saved under tp2 resume under tp1 and dp2 (DCP reshards the DTensors).

Tolerance: fp32 on CPU. One TP step gives the plain step's loss and gradients to ~1e-7 relative
(tests/distributed/test_tp.py), but matmuls split over ranks sum in another order and Adam carries the
rounding forward, so the 20-step curves drift apart slowly: losses agree to TOLERANCE relative
(measured: see the constant), the same way data parallelism drifts (test_train_dp.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from llamatron.cli.main import main
from tests.distributed.test_train_dp import corpus, losses, run_train  # noqa: F401 - corpus is a fixture

REPO = Path(__file__).resolve().parents[2]
DEMO_SFT = REPO / "src" / "llamatron" / "assets" / "sft" / "demo_alpaca.jsonl"
# A gentle learning rate keeps the tiny job out of its chaotic early phase, where any rounding
# difference (even between two data-parallel sizes) grows by orders of magnitude within a few steps.
JOB = ("--optim.lr=1e-3", "--optim.min_lr=1e-4", "--checkpoint.save_interval=1000", "--checkpoint.save_at_end=false",
       "--training.global_batch_size=4", "--training.seq_len=32")
SFT = ("--data.kind=sft", "--data.packing=true", "--training.seq_len=256", "--training.eval_interval=0")
TOLERANCE = 1e-5
SP = "--parallel.sequence_parallel=true"
NO_SP = "--parallel.sequence_parallel=false"


@pytest.mark.slow
def test_pretraining_losses_under_tp_equal_one_process(tmp_path, corpus):  # noqa: F811
    single = run_train(tmp_path / "single", corpus, *JOB)
    for name, extra, nproc in (("tp2-sp", (SP,), 2), ("tp2", (NO_SP,), 2), ("dp2-tp2-sp", (SP,), 4)):
        multi = run_train(tmp_path / name, corpus, *JOB, "--parallel.tp=2", *extra, nproc=nproc)
        np.testing.assert_allclose(losses(multi), losses(single), rtol=TOLERANCE, err_msg=name)
        if nproc == 2:  # dp 1: validation reads the same samples as one process (it splits rounds over dp)
            valid = [(r["valid_loss"], s["valid_loss"]) for r, s in zip(multi, single, strict=True) if "valid_loss" in s]
            assert len(valid) == 2
            np.testing.assert_allclose(*zip(*valid, strict=True), rtol=TOLERANCE, err_msg=name)


@pytest.mark.slow
def test_packed_sft_losses_under_tp_equal_one_process(tmp_path):
    single = losses(run_train(tmp_path / "single", DEMO_SFT, *JOB, *SFT))
    for name, extra, nproc in (("tp2-sp", (SP,), 2), ("dp2-tp2", (NO_SP,), 4)):
        multi = losses(run_train(tmp_path / name, DEMO_SFT, *JOB, *SFT, "--parallel.tp=2", *extra, nproc=nproc))
        np.testing.assert_allclose(multi, single, rtol=TOLERANCE, err_msg=name)


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp1_and_dp2(tmp_path, corpus):  # noqa: F811
    straight = losses(run_train(tmp_path / "straight", corpus, *JOB))
    saved = ("--checkpoint.save_interval=10", "--training.exit_interval=10")
    run_train(tmp_path / "tp2", corpus, *JOB, *saved, "--parallel.tp=2", SP, nproc=2)
    for name, nproc in (("tp1", 1), ("dp2", 2)):
        shutil.copytree(tmp_path / "tp2", tmp_path / name)
        resumed = losses(run_train(tmp_path / name, corpus, *JOB, nproc=nproc))
        assert len(resumed) == 20
        np.testing.assert_allclose(resumed, straight, rtol=TOLERANCE, err_msg=name)


def test_tp_above_the_kv_heads_is_refused_with_every_problem(tmp_path, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "run"), "--tp", "4",
                 "--nproc-per-node", "4", "--data.data_path=unused"])
    assert code == 2
    err = capsys.readouterr().err
    assert "above the model's 2 KV heads" in err and "KV heads (2) is not divisible by parallel.tp=4" in err, err
