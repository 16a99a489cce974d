"""A process killed at any point of a checkpoint save leaves the previous checkpoint loadable, and
rerunning the command resumes and reproduces the uninterrupted run exactly (fp32, same process count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL_VOCAB_EOD, SMALL_VOCAB_MODEL, write_random_corpus

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("crash") / "corpus_text_document"
    write_random_corpus(prefix, seed=2, documents=200, vocab=2000, eod=SMALL_VOCAB_EOD)
    return prefix


def _args(out: Path, corpus: Path) -> list[str]:
    return ["train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}",
            f"--model.name={SMALL_VOCAB_MODEL}", "--train-iters", "8", "--save-interval", "3", "--training.eval_interval=0"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> list[float]:
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = _run([sys.executable, "-m", "llamatron.cli.main", *_args(out, corpus)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["during_shards", "before_rename", "before_marker"])
def test_kill_during_save_then_resume(tmp_path, corpus, straight, point):
    out = tmp_path / "run"
    crashed = _run([sys.executable, str(HERE / "crash_during_save.py"), point, "2", *_args(out, corpus)])
    assert crashed.returncode == 137, crashed.stderr[-3000:]
    # The first checkpoint (iteration 3) is still the latest complete one.
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"
    resumed = _run([sys.executable, "-m", "llamatron.cli.main", *_args(out, corpus)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert _losses(out) == straight
