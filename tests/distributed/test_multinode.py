"""Two nodes simulated on one machine: two launchers on a loopback rendezvous, through llamatron's own
flags and through the seed's dlc mode (its environment variables). Both must log the losses of the
one-node run with the same global batch (fp32; 1e-4 relative: the gradient sum order differs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SMALL_VOCAB_EOD, SMALL_VOCAB_MODEL, write_random_corpus

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "examples" / "llama3_1" / "run_mcore_llama3_1.sh"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("mn") / "corpus_text_document"
    write_random_corpus(prefix, seed=3, documents=200, vocab=2000, eod=SMALL_VOCAB_EOD)
    return prefix


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "LLAMATRON": f"{sys.executable} -m llamatron.cli.main", **extra}


def _train_args(out: Path, corpus: Path) -> list[str]:
    return ["train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}",
            f"--model.name={SMALL_VOCAB_MODEL}", "--train-iters", "6", "--training.eval_interval=0"]


def _start(cmd: list[str], *, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    """A launcher writing to a file: pipes read one process at a time can fill and block the other node."""
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True), log


def _wait_all(procs: list[tuple[subprocess.Popen, Path]], timeout: float = 1500) -> None:
    """Every node exits 0; the first failure stops the others (a lone node would wait for its peer)."""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc, _ in procs) and time.monotonic() < deadline:
        failed = [(proc, log) for proc, log in procs if proc.poll() not in (None, 0)]
        if failed:
            break
        time.sleep(0.5)
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for proc, log in procs:
        assert proc.returncode == 0, log.read_text()[-3000:]


def test_two_launchers_with_nnodes_2_match_one_node(tmp_path, corpus):
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "llamatron.cli.main", *_train_args(single, corpus)], env=_env(),
                   check=True, capture_output=True, timeout=1500)
    port = str(_free_port())
    out = tmp_path / "two-nodes"
    procs = [
        _start(
            [sys.executable, "-m", "llamatron.cli.main", *_train_args(out, corpus), "--nproc-per-node", "1",
             "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port],
            env=_env(), log=tmp_path / f"node{rank}.log",
        )
        for rank in range(2)
    ]
    _wait_all(procs)
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=1e-4)


def test_seed_dlc_mode_on_two_simulated_nodes(tmp_path, corpus):
    args = ["dlc", "tiny", "1", "8", "1e-3", "1e-4", "64", "64", "fp32", "1", "1", "1", "false", "true", "true",
            "false", "false", "false", "1000", str(corpus), str(corpus), "none", "4096", "0"]
    dsw = tmp_path / "dsw"
    subprocess.run(["bash", str(LAUNCHER), *["dsw", *args[1:]], str(dsw)],
                   env=_env(GPUS_PER_NODE="2"), check=True, capture_output=True, timeout=1500)
    port = str(_free_port())
    dlc = tmp_path / "dlc"
    procs = [
        _start(
            ["bash", str(LAUNCHER), *args, str(dlc)],
            env=_env(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     KUBERNETES_CONTAINER_RESOURCE_GPU="1"),
            log=tmp_path / f"dlc-node{rank}.log",
        )
        for rank in range(2)
    ]
    _wait_all(procs)
    (dsw_run,) = list((dsw / "checkpoint").iterdir())
    (dlc_run,) = list((dlc / "checkpoint").iterdir())
    assert len(_losses(dlc_run)) == 4096 // (8 * 64)
    np.testing.assert_allclose(_losses(dlc_run), _losses(dsw_run), rtol=1e-4)
