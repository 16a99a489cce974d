"""SIGTERM during training: every rank stops at the same step, a checkpoint is saved, the exit is clean,
and rerunning the command finishes with the losses of an uninterrupted run (fp32, exact)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL_VOCAB_EOD, SMALL_VOCAB_MODEL, write_random_corpus

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cmd(out: Path, corpus: Path, *extra: str, iters: int = 12) -> list[str]:
    return [sys.executable, "-m", "llamatron.cli.main", "train", "--config", "tiny-debug", "--output", str(out),
            f"--data.data_path={corpus}", "--train-iters", str(iters), "--save-interval", "1000",
            "--training.eval_interval=0", *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_steps(out: Path, steps: int, timeout: float = 1200) -> None:
    """Until the run in `out` has logged `steps` steps (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)


def test_sigterm_saves_and_resume_matches(tmp_path):
    write_random_corpus(tmp_path / "corpus", seed=5, documents=150)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, tmp_path / "corpus"), env=env, check=True, capture_output=True, timeout=1500)

    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, tmp_path / "corpus"), env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    _wait_for_steps(out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err
    stopped_at = len(_losses(out))
    assert 3 <= stopped_at < 12
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped_at:07d}"
    subprocess.run(_cmd(out, tmp_path / "corpus"), env=env, check=True, capture_output=True, timeout=1500)
    assert _losses(out) == _losses(straight)


def _worker_pid(out: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` training into `out` (found through /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return int(entry.name)
    return None


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # A scheduler may signal the ranks at different moments: the one that got it tells the others through the
    # step's stop flag, so all save the same checkpoint and exit cleanly (that a checkpoint resumes exactly is
    # the test above's).
    write_random_corpus(tmp_path / "corpus", seed=6, documents=150, vocab=2000, eod=SMALL_VOCAB_EOD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    small = (f"--model.name={SMALL_VOCAB_MODEL}", "--nproc-per-node", "2")
    proc = subprocess.Popen(_cmd(out, tmp_path / "corpus", *small, iters=200), env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _wait_for_steps(out, 3)
    pid = _worker_pid(out, rank=1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("(SIGTERM); run the same command to continue") == 1  # rank 0 logs, having got no signal
    stopped_at = len(_losses(out))
    assert 3 <= stopped_at < 200
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped_at:07d}"
