"""The trainer under context parallelism (gloo: cp2 on 2 processes, tp2 x cp2 with sequence parallelism
on 4, tp2 x cp2 x dp2 on 8 over 20 iterations) against one process, for pretraining (with validation; the
tp2 x cp2 run resumes from the cp2 run's checkpoint, so DCP reshards it onto the other layout) and packed
SFT (the seed's sequence-mean loss).

Tolerance: fp32 on CPU. Ring attention sums the softmax in another order (about 1e-7 relative per
attention, tests/unit/parallel/test_ring_attention.py) and Adam carries the rounding forward. Losses must
agree to 1e-5 relative; measured (2026-11-28, 6 iterations): at most 1.5e-7 for every run here. Every run
here is the 20-iteration job since 2026-12-04, at the same bound."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from llamatron.cli.main import main
from tests.distributed.test_tp_train import DEMO_SFT, JOB, SFT, SP
from tests.distributed.test_train_dp import corpus, losses, run_train  # noqa: F401 - corpus is a fixture

TOLERANCE = 1e-5  # measured <= 1.5e-7 (module docstring)
SHORT = ("--train-iters", "20")  # the 20-iteration job
CP2 = ("--parallel.cp=2",)
TP2_CP2 = ("--parallel.cp=2", "--parallel.tp=2", SP)


def _assert_same(runs: dict[str, list[dict]], single: list[dict], *, iterations: int = 20) -> None:
    for name, records in runs.items():
        assert [r["iteration"] for r in records] == list(range(1, iterations + 1)), name
        np.testing.assert_allclose(losses(records), losses(single), rtol=TOLERANCE, err_msg=name)


@pytest.mark.slow
def test_pretraining_losses_under_cp_equal_one_process(tmp_path, corpus):  # noqa: F811
    job = (*JOB, *SHORT, "--training.eval_interval=5")
    single = run_train(tmp_path / "single", corpus, *job)
    runs = {"cp2": run_train(tmp_path / "cp2", corpus, *job, *CP2, "--checkpoint.save_interval=10", nproc=2)}
    # tp2 x cp2 continues the cp2 run from its checkpoint at iteration 10.
    resumed = tmp_path / "tp2-cp2-sp"
    shutil.copytree(tmp_path / "cp2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000020")
    (resumed / "checkpoints" / "latest").write_text("step-0000010")
    runs["tp2-cp2-sp"] = run_train(resumed, corpus, *job, *TP2_CP2, nproc=4)
    _assert_same(runs, single)
    for name, records in runs.items():  # dp 1: validation reads the same samples as one process
        valid = [(r["valid_loss"], s["valid_loss"]) for r, s in zip(records, single, strict=True) if "valid_loss" in s]
        assert len(valid) == 4, name
        np.testing.assert_allclose(*zip(*valid, strict=True), rtol=TOLERANCE, err_msg=name)


@pytest.mark.slow
def test_packed_sft_losses_under_cp_equal_one_process(tmp_path):
    single = run_train(tmp_path / "single", DEMO_SFT, *JOB, *SFT, *SHORT)
    runs = {name: run_train(tmp_path / name, DEMO_SFT, *JOB, *SFT, *SHORT, *flags, nproc=nproc)
            for name, flags, nproc in (("cp2", CP2, 2), ("tp2-cp2-sp", TP2_CP2, 4))}
    _assert_same(runs, single)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretraining", "packed-sft"])
def test_tp2_cp2_dp2_on_8_processes_equals_one_process_over_20_iterations(tmp_path, corpus, kind):  # noqa: F811
    """Every parallel dimension but pp at once: 8 processes, dp = 8 / (tp 2 x cp 2) = 2, with sequence
    parallelism, the full 20 iterations of the tiny-debug job."""
    data, job = (corpus, (*JOB, "--training.eval_interval=0")) if kind == "pretraining" else (DEMO_SFT, (*JOB, *SFT))
    job = (*job, "--train-iters", "20")
    single = run_train(tmp_path / "single", data, *job)
    runs = {"tp2-cp2-dp2": run_train(tmp_path / "tp2-cp2-dp2", data, *job, *TP2_CP2, nproc=8)}
    first = runs["tp2-cp2-dp2"][0]
    assert round(first["tokens_per_s"] / first["tokens_per_s_per_gpu"]) == 8  # the throughput counts 8 ranks
    _assert_same(runs, single, iterations=20)


def test_cp_layout_problems_are_refused_with_every_problem(tmp_path, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "run"), "--tp", "4", "--cp", "2",
                 "--nproc-per-node", "8", "--data.data_path=unused", SP, "--training.seq_len=36",
                 "--data.kind=sft", "--data.pad_len=30"])
    assert code == 2
    err = capsys.readouterr().err
    # Each cp rank's 18 positions do not split 4 ways; 30 is not 4 chunks (and the tp problems are listed too).
    assert "training.seq_len=36 does not split over parallel.cp=2 x parallel.tp=4" in err, err
    assert "data.pad_len=30 is not divisible by 2*parallel.cp=4" in err, err
    assert not (tmp_path / "run").exists()
