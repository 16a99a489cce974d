"""Shared fixtures. Tests mirror the package: tests/unit/<package>/..., tests/distributed, tests/e2e."""

from __future__ import annotations

import pytest
import torch

from llamatron.model.config import LlamaConfig, RopeScaling

SHARED_DIR_CANDIDATES = ("../shared", "../../shared")


def find_shared_dir():
    """The `shared/` directory beside the repository (test vectors live in shared/testdata)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for candidate in SHARED_DIR_CANDIDATES:
        path = (repo / candidate).resolve()
        if (path / "testdata").is_dir():
            return path
    pytest.fail(f"shared/testdata not found beside the repository {repo}; CI must check out shared/ next to it")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a test's child process (torchrun workers, the CLI): the repository's src/ and
    root ahead of whatever PYTHONPATH already holds, so children import this checkout whether or not the
    package is installed, and one thread each."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(repo / "src"), str(repo), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


@pytest.fixture
def shared_dir():
    return find_shared_dir()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI; one intra-op thread per xdist worker keeps runs from fighting over them.
    torch.set_num_threads(1)
    yield


def tiny_config(**changes) -> LlamaConfig:
    """A random-init-friendly config with GQA and Llama 3.1 scaling (original context tiny so the
    scaling's three frequency bands all occur at head_dim 16)."""
    base = LlamaConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
        max_position_embeddings=512, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
        bos_token_id=1, eos_token_id=2,
    )
    return base.replace(**changes)


# The model for tests of training mechanics on token-id data: `tiny` with a 2048-id vocabulary (~10x less CPU
# per step than the 128k Llama 3 vocabulary). Corpora for it use ids below SMALL_VOCAB_EOD, which ends documents.
SMALL_VOCAB_MODEL = "tiny-2k"
SMALL_VOCAB_EOD = 2047


def write_random_corpus(prefix, *, seed: int, documents: int, vocab: int = 3000, eod: int = 128001) -> None:
    """A Megatron indexed dataset of random documents (20-149 ids below `vocab`, then `eod`) for trainer tests."""
    import numpy as np

    from llamatron.data.indexed import write_documents

    rng = np.random.default_rng(seed)
    docs = [[*rng.integers(0, vocab, size=int(rng.integers(20, 150))).tolist(), eod] for _ in range(documents)]
    write_documents(prefix, docs, dtype=np.int32)
