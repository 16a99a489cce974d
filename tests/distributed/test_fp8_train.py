"""The trainer in fp8 (torchao's emulated float8 on CPU) over 2 gloo data-parallel ranks, where FSDP2
all-gathers the weights in fp8 and refreshes their scales after each optimizer step, logs losses close to
a one-process bf16 run of the same job; both runs log the attention kernel that ran.

Model: a 2-layer vocab-256 Llama (tiny_config) saved as a HF directory, so a run costs seconds, not the
tiny preset's 128k-vocabulary minute. Tolerance: 3e-2 relative over 8 iterations (measured 8e-3: fp8
quantisation error carried through AdamW at tiny-debug's lr 1e-2); fp8's casts themselves are checked
exactly in tests/unit/parallel/test_fp8.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llamatron.checkpoint.hf import save_hf_model
from llamatron.data.indexed import write_documents
from llamatron.model import build_model
from tests.conftest import tiny_config
from tests.distributed.test_train_dp import REPO, losses

SHORT = ("--train-iters", "8", "--training.eval_interval=0", "--checkpoint.save_at_end=false")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(HF model directory, corpus prefix): counting runs over ids < 250, EOD 255."""
    root = tmp_path_factory.mktemp("fp8")
    config = tiny_config(vocab_size=256, eos_token_id=255)
    save_hf_model(build_model(config, seed=3), root / "model")
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(300):
        start, length = int(rng.integers(0, 200)), int(rng.integers(20, 120))
        docs.append([*((start + i % 50) % 250 for i in range(length)), 255])
    write_documents(root / "corpus_text_document", docs, dtype=np.int32)
    return root / "model", root / "corpus_text_document"


def _train(out, corpus, *extra: str, nproc: int = 1) -> tuple[list[dict], str]:
    """(metrics records, the run's stderr log)."""
    cmd = [sys.executable, "-m", "llamatron.cli.main", "train", "--config", "tiny-debug", "--output", str(out),
           f"--data.data_path={corpus}", *extra]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stderr


@pytest.mark.slow
def test_fp8_over_two_ranks_tracks_bf16(tmp_path, small):
    model, corpus = small
    common = (*SHORT, f"--model.name={model}")
    # The reference also takes the seed's FL=false: flash left out, so math runs on CPU.
    bf16, bf16_log = _train(tmp_path / "bf16", corpus, *common, "--training.precision=bf16",
                            "--parallel.flash_attention=false")
    fp8, fp8_log = _train(tmp_path / "fp8", corpus, *common, "--training.precision=fp8", "--training.fp8_emulate=true",
                          nproc=2)
    assert "attention backend: math (parallel.attention_backend=auto, enabled in order: cudnn, efficient, math" in bf16_log
    assert "attention backend: flash (CPU kernel)" in fp8_log
    assert ("fp8 tensorwise scaling (emulated): 14 linears in fp8, kept in bf16: lm_head (output layer); "
            "fp8 all-gather under FSDP: on") in fp8_log
    assert [r["iteration"] for r in fp8] == list(range(1, 9))
    np.testing.assert_allclose(losses(fp8), losses(bf16), rtol=3e-2)
    assert losses(fp8)[-1] < losses(fp8)[0] - 1.0
