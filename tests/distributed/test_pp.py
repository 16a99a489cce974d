"""The trainer under pipeline parallelism (gloo, 2 and 4 processes) against one process: 1F1B (pp2 with
uneven stages), interleaved 1F1B (pp2 x 2 virtual stages), tp2 x pp2 with sequence parallelism and
pp2 x cp2, for pretraining (with validation) and packed SFT; a tp2 x pp2 checkpoint holds the
one-process weights, exports, and resumes at dp4 and at pp2 x cp2; a tied-embedding model (Llama 3.2's
layout) trains across pp2 and one process, each resuming the other's checkpoint; bad layouts are
refused before launch with every problem listed.

Tolerance: fp32 on CPU. The stages run the same operations as one process; tp splits matmuls and cp
splits attention (sums in another order); Adam carries the rounding forward. Losses and validation
losses must agree to 1e-5 relative, gradient norms to 5e-5 (tp alone moves them by 3.3e-6: the
vocabulary-parallel loss forms its gradient its own way; cp by as much). Measured (2026-11-28, 6
iterations): losses at most 1e-7, validation 8e-8, gradient norms 1.5e-7 without tp or cp, 7.3e-6 with
them. A stage left out of the norm, or a tied embedding counted twice, moves it by far more. The layout
runs are the 20-iteration job since 2026-12-04, at the same bounds.

run_layout and LAYOUTS are meant for reuse: a layout is its CLI flags and its process count."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llamatron.checkpoint.dcp import load_dcp_model
from llamatron.checkpoint.hf import load_hf_model, save_hf_model
from llamatron.cli.main import main
from llamatron.data.packing import IGNORE_INDEX, build_row
from llamatron.data.sft_idxmap import write_sft_idxmap
from llamatron.model import build_model, preset
from tests.conftest import SMALL_VOCAB_MODEL
from tests.distributed.test_tp_train import JOB, SP, read_metrics
from tests.distributed.test_train_dp import corpus, losses, run_train  # noqa: F401 - corpus is a fixture

TOLERANCE = 1e-5  # losses, measured <= 6.4e-8 (module docstring)
GRAD_NORM_TOLERANCE = 5e-5  # measured <= 7.3e-6 with tp, 1.5e-7 without
# The 20 iterations, validation and a checkpoint at 10 and 20. The global batch of 4 in
# micro-batches of 2 gives every pipeline the 2 micro-batches both schedules need at pp2.
SHORT = ("--train-iters", "20", "--checkpoint.save_interval=10")
LAYOUTS: dict[str, tuple[tuple[str, ...], int]] = {
    "pp2-uneven": (("--parallel.pp=2", "--parallel.pp_layers=1,3"), 2),
    "pp2-vp2": (("--parallel.pp=2", "--parallel.virtual_pipeline=2"), 2),
    "tp2-pp2-sp": (("--parallel.pp=2", "--parallel.tp=2", SP), 4),
    "pp2-cp2": (("--parallel.pp=2", "--parallel.cp=2"), 4),
}


def run_layout(out: Path, data: Path, layout: str, *extra: str, model: str | None = None) -> list[dict]:
    """The short job under a named layout (LAYOUTS; "single" is one process); its metrics records."""
    flags, nproc = LAYOUTS[layout] if layout != "single" else ((), 1)
    return run_train(out, data, *JOB, *SHORT, *extra, *flags, nproc=nproc, model=model)


def assert_same_run(records: list[dict], single: list[dict], *, name: str) -> None:
    """Losses and gradient norms match one process; tokens are counted alike; validation (dp 1 here:
    the same samples as one process) matches where it ran."""
    np.testing.assert_allclose(losses(records), losses(single), rtol=TOLERANCE, err_msg=name)
    grad_norms = [[r["grad_norm"] for r in run] for run in (records, single)]
    np.testing.assert_allclose(*grad_norms, rtol=GRAD_NORM_TOLERANCE, err_msg=name)
    assert [r["consumed_tokens"] for r in records] == [r["consumed_tokens"] for r in single], name
    valid = [(r["valid_loss"], s["valid_loss"]) for r, s in zip(records, single, strict=True) if "valid_loss" in s]
    assert all("valid_loss" in r for r, s in zip(records, single, strict=True) if "valid_loss" in s), name
    if valid:
        np.testing.assert_allclose(*zip(*valid, strict=True), rtol=TOLERANCE, err_msg=name)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "run"
    run_layout(out, corpus, "single", "--training.eval_interval=10")
    return out


@pytest.fixture(scope="module")
def tp2_pp2_run(tmp_path_factory, corpus) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("tp2-pp2") / "run"
    run_layout(out, corpus, "tp2-pp2-sp", "--training.eval_interval=10")
    return out


@pytest.mark.slow
def test_pretraining_under_pp_equals_one_process(tmp_path, corpus, single_run, tp2_pp2_run):  # noqa: F811
    single = read_metrics(single_run)
    assert sum("valid_loss" in r for r in single) == 2
    assert_same_run(read_metrics(tp2_pp2_run), single, name="tp2-pp2-sp")
    for name in LAYOUTS.keys() - {"tp2-pp2-sp"}:
        assert_same_run(run_layout(tmp_path / name, corpus, name, "--training.eval_interval=10"), single, name=name)


@pytest.mark.slow
def test_tp2_pp2_checkpoint_exports_and_resumes_at_dp4_and_pp2_cp2(tmp_path, corpus, single_run, tp2_pp2_run):  # noqa: F811
    # Every rank saved its stage's share under the global names: the whole model reads back, as one
    # process's weights. Adam's step normalises the gradient, so where a gradient is near zero a rounding
    # difference moves a weight by up to ~lr: compared per tensor as a whole, measured <= 7.9e-6 relative.
    step = "checkpoints/step-0000010"
    pp_model, _ = load_dcp_model(tp2_pp2_run / step)
    one_model, _ = load_dcp_model(single_run / step)
    for (name, a), (_, b) in zip(pp_model.state_dict().items(), one_model.state_dict().items(), strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm(), name
    assert main(["export", "--run", str(tp2_pp2_run), "--to", "hf", "--out", str(tmp_path / "hf"),
                 "--dtype", "fp32"]) == 0
    exported, latest = load_hf_model(tmp_path / "hf"), load_dcp_model(tp2_pp2_run)[0]
    for name, tensor in latest.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name

    # Micro-batches of 1 at dp4: the global batch of 4 over 4 data-parallel ranks.
    for name, flags in (("dp4", ("--training.micro_batch_size=1",)), ("pp2-cp2", LAYOUTS["pp2-cp2"][0])):
        out = tmp_path / name
        shutil.copytree(tp2_pp2_run, out)
        shutil.rmtree(out / "checkpoints" / "step-0000020")
        (out / "checkpoints" / "latest").write_text("step-0000010")
        resumed = run_train(out, corpus, *JOB, *SHORT, *flags, nproc=4)
        assert [r["iteration"] for r in resumed] == list(range(1, 21))
        np.testing.assert_allclose(losses(resumed), losses(read_metrics(single_run)), rtol=TOLERANCE, err_msg=name)


@pytest.fixture(scope="module")
def packed_sft(tmp_path_factory) -> Path:
    """An SFT idxmap (the seed's preprocessed format) of 64 packed rows of 64 ids below 2047 (tiny-2k's
    vocabulary; 2047 pads): 2-5 samples per row, each with its prompt masked, so every micro-batch
    carries positions and document ids and the seed's per-sample mean loss applies."""
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(64):
        samples, used = [], 0
        while (length := int(rng.integers(8, 25))) + used <= 64:
            ids = rng.integers(0, 2000, size=length)
            labels = np.full(length, IGNORE_INDEX)
            prompt = int(rng.integers(2, length - 2))
            labels[prompt:-1] = ids[prompt + 1:]  # pre-shifted: position i predicts token i + 1
            samples.append((ids, labels))
            used += length
        rows.append(build_row(samples, seq_len=64, pad_id=2047))
    prefix = tmp_path_factory.mktemp("sft") / "packed"
    write_sft_idxmap(prefix, rows)
    return prefix


@pytest.mark.slow
def test_packed_sft_under_pp_equals_one_process(tmp_path, packed_sft):
    sft = ("--data.kind=sft", "--data.sft_format=idxmap", "--training.seq_len=64", "--training.eval_interval=10",
           f"--data.valid_data_path={packed_sft}")
    single = run_layout(tmp_path / "single", packed_sft, "single", *sft, model=SMALL_VOCAB_MODEL)
    assert sum("valid_loss" in r for r in single) == 2
    for name in LAYOUTS:
        assert_same_run(run_layout(tmp_path / name, packed_sft, name, *sft, model=SMALL_VOCAB_MODEL), single,
                        name=name)


@pytest.mark.slow
def test_tied_embeddings_across_pp2_and_one_process(tmp_path, corpus):  # noqa: F811
    """The last stage's copy of the embedding gets the summed gradient (as the one shared matrix), so
    pp2 continues one process's run and one process continues pp2's with the straight run's losses."""
    hf = save_hf_model(build_model(preset(SMALL_VOCAB_MODEL).replace(tie_word_embeddings=True), seed=5),
                       tmp_path / "tied-hf")
    job = (*JOB, f"--model.init_from={hf}", "--training.eval_interval=0", "--train-iters", "4",
           "--checkpoint.save_interval=2")
    straight = run_train(tmp_path / "straight", corpus, *job, model=str(hf))
    out = tmp_path / "switching"
    shutil.copytree(tmp_path / "straight", out)
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "checkpoints" / "latest").write_text("step-0000002")
    # pp2 reads its output layer's optimizer state from the embedding's (saved without a pipeline) ...
    run_train(out, corpus, *job, "--parallel.pp=2", "--training.exit_interval=3", nproc=2, model=str(hf))
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"
    # ... and one process reads pp2's checkpoint, the shared matrix's state from the first stage's.
    switched = run_train(out, corpus, *job, model=str(hf))
    assert [r["iteration"] for r in switched] == list(range(1, 5))
    np.testing.assert_allclose(losses(switched), losses(straight), rtol=TOLERANCE)


def test_pp_layout_problems_are_refused_with_every_problem(tmp_path, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "run"), "--pp", "2",
                 "--parallel.virtual_pipeline=3", "--training.micro_batch_size=8", "--nproc-per-node", "2",
                 "--data.data_path=unused"])
    assert code == 2
    err = capsys.readouterr().err
    assert "2 problems" in err, err
    assert "4 layers do not split evenly into pp*virtual_pipeline = 6 stages" in err, err
    assert "interleaved pipeline schedule (virtual_pipeline=3) needs a multiple of pp=2 micro-batches" in err, err
    assert not (tmp_path / "run").exists()
