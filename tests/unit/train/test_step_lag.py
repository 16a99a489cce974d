"""On a GPU the training loop reads a step's figures after queuing the next one, except where the host acts on the
state after the step (a checkpoint, evaluation, a profile's end, the last step): there it reads the step
first and queues nothing else before acting. And each logged record holds its own step's numbers."""

from __future__ import annotations

import json

import pytest
import torch

from llamatron.cli.main import main
from llamatron.train import trainer as trainer_module
from llamatron.train.optim import LRSchedule
from tests.conftest import SMALL_VOCAB_EOD, SMALL_VOCAB_MODEL, write_random_corpus

ITERS, SAVE, EVAL, GLOBAL_BATCH = 9, 4, 6, 4


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, int]]:
    """("queued", k), ("read", k), ("saved", k), ("evaluated", k) in the order the loop did them."""
    seen: list[tuple[str, int]] = []
    train_step, resolve = trainer_module.Trainer.train_step, trainer_module.QueuedStep.resolve
    save, evaluate = trainer_module.Trainer.save, trainer_module.Trainer.evaluate

    def queued(self):
        step = train_step(self)
        seen.append(("queued", step.iteration))
        return step

    def read(self):
        seen.append(("read", self.iteration))
        return resolve(self)

    def saved(self):
        seen.append(("saved", self.state.iteration))
        return save(self)

    def evaluated(self):
        seen.append(("evaluated", self.state.iteration))
        return evaluate(self)

    monkeypatch.setattr(trainer_module.Trainer, "_runs_ahead", lambda self: True)  # as on a GPU
    monkeypatch.setattr(trainer_module.Trainer, "train_step", queued)
    monkeypatch.setattr(trainer_module.QueuedStep, "resolve", read)
    monkeypatch.setattr(trainer_module.Trainer, "save", saved)
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluated)
    return seen


def test_steps_are_read_one_behind_except_where_the_host_acts(tmp_path, events):
    write_random_corpus(tmp_path / "corpus", seed=3, documents=120, vocab=2000, eod=SMALL_VOCAB_EOD)
    out = tmp_path / "run"
    code = main([
        "train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={tmp_path / 'corpus'}",
        f"--model.name={SMALL_VOCAB_MODEL}",
        "--train-iters", str(ITERS), "--save-interval", str(SAVE), f"--training.eval_interval={EVAL}",
        f"--training.global_batch_size={GLOBAL_BATCH}", "--training.micro_batch_size=2",
        "--optim.lr=1e-3", "--optim.min_lr=1e-4", "--training.warmup_iters=2", "--logging.profile_iterations=2,3",
    ])
    assert code == 0
    position = {event: index for index, event in enumerate(events)}
    host_acts = {3, SAVE, EVAL, 2 * SAVE, ITERS}  # profile end, checkpoints, evaluation, the end
    for k in range(1, ITERS + 1):
        if k in host_acts:
            assert k == ITERS or position[("read", k)] < position[("queued", k + 1)], (k, events)
        else:
            assert position[("queued", k + 1)] < position[("read", k)], (k, events)
    for k in (SAVE, 2 * SAVE, ITERS):  # a checkpoint holds exactly the steps read before it
        assert position[("read", k)] < position[("saved", k)]
        assert k == ITERS or position[("saved", k)] < position[("queued", k + 1)]
    assert position[("read", EVAL)] < position[("evaluated", EVAL)] < position[("queued", EVAL + 1)]
    assert (out / "profile" / "kernels_rank0.txt").is_file()

    # Each record is its own step's: iteration order, its learning rate and sample count.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    schedule = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=2, decay_iters=ITERS)
    for r in records:
        assert r["lr"] == pytest.approx(schedule.lr_at(r["iteration"] - 1), rel=1e-12)
        assert r["consumed_samples"] == GLOBAL_BATCH * r["iteration"]
    assert "valid_loss" in records[EVAL - 1] and "valid_loss" not in records[EVAL - 2]


def _run(tmp_path, name: str, corpus, *, device: str) -> list[dict]:
    out = tmp_path / name
    code = main([
        "train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}", "--train-iters", "6",
        f"--model.name={SMALL_VOCAB_MODEL}",
        "--save-interval", "100", "--checkpoint.save_at_end=false", "--training.eval_interval=0",
        f"--training.device={device}",
        # One attention kernel for both runs: auto's timed probe chose cuDNN for one and flash for the other
        # on an H100 (grad norms then 4e-4 apart); math has no atomics in its backward.
        *(["--training.precision=bf16", "--parallel.attention_backend=math"] if device == "cuda" else []),
    ])
    assert code == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_running_a_step_ahead_trains_as_reading_every_step(tmp_path, monkeypatch, device):
    # The same computation whether the loop reads each step before queuing the next or a step later (with
    # pinned, non-blocking batch copies on CUDA): equal on CPU; on CUDA to 1e-4 relative (two CUDA runs may
    # differ in the last bits where a kernel adds with atomics).
    write_random_corpus(tmp_path / "corpus", seed=4, documents=120, vocab=2000, eod=SMALL_VOCAB_EOD)
    runs = {}
    for ahead in (True, False):
        monkeypatch.setattr(trainer_module.Trainer, "_runs_ahead", lambda self, ahead=ahead: ahead)
        runs[ahead] = _run(tmp_path, f"ahead-{ahead}", tmp_path / "corpus", device=device)
    tolerance = 0 if device == "cpu" else 1e-4
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["iteration"] == b["iteration"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=tolerance) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=tolerance)
    if device == "cuda":  # each step timed by its own work: the host's clock logged ~0 s for the last one
        times = [r["step_time_s"] for r in runs[True][1:]]
        assert min(times) > 0.3 * sorted(times)[len(times) // 2], times


def test_on_the_cpu_each_step_is_read_before_the_next_is_queued():
    class CPU:
        env = type("Env", (), {"device": torch.device("cpu")})()

    assert not trainer_module.Trainer._runs_ahead(CPU())
