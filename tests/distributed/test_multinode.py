"""Two nodes simulated on one machine: two launchers on a loopback rendezvous, through llamatron's own
flags and through the seed's dlc mode (its environment variables). Both must log the losses of the
one-node run with the same global batch (fp32; 1e-4 relative: the gradient sum order differs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_random_corpus

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
    write_random_corpus(prefix, seed=3, documents=200)
    return prefix


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "LLAMATRON": f"{sys.executable} -m llamatron.cli.main", **extra}


def _train_args(out: Path, corpus: Path) -> list[str]:
    return ["train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}",
            "--train-iters", "6", "--training.eval_interval=0"]


def _wait_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, err[-3000:]


def test_two_launchers_with_nnodes_2_match_one_node(tmp_path, corpus):
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "llamatron.cli.main", *_train_args(single, corpus)], env=_env(),
                   check=True, capture_output=True, timeout=1500)
    port = str(_free_port())
    out = tmp_path / "two-nodes"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llamatron.cli.main", *_train_args(out, corpus), "--nproc-per-node", "1",
             "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
        subprocess.Popen(
            ["bash", str(LAUNCHER), *args, str(dlc)],
            env=_env(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     KUBERNETES_CONTAINER_RESOURCE_GPU="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    _wait_all(procs)
    (dsw_run,) = list((dsw / "checkpoint").iterdir())
    (dlc_run,) = list((dlc / "checkpoint").iterdir())
    assert len(_losses(dlc_run)) == 4096 // (8 * 64)
    np.testing.assert_allclose(_losses(dlc_run), _losses(dsw_run), rtol=1e-4)
