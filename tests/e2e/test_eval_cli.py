"""`llamatron eval` end to end on CPU with a tiny random Llama and the Llama 3 tokenizer over the shipped
CMMLU demo set: the same model as HF and as Megatron-Core TP2 x PP2 gives the same per-question
log-likelihoods (1e-5 absolute, fp32) and scores; two gloo processes give what one does; bad input
fails with one clear line. `eval ppl` is checked against transformers' loss on the same windows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llamatron.cli.main import main
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "src" / "llamatron" / "assets" / "eval" / "cmmlu_demo"
pytestmark = pytest.mark.xdist_group("eval")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from llamatron.checkpoint.convert import hf_to_mcore
    from llamatron.checkpoint.hf import save_hf_model
    from llamatron.model import build_model

    root = tmp_path_factory.mktemp("eval-models")
    config = tiny_config(vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=128000, eos_token_id=128001)
    model = build_model(config, seed=3)
    hf = save_hf_model(model, root / "hf", dtype=torch.float32, tokenizer="llama3")
    mcore = hf_to_mcore(hf, root / "mcore", tp=2, pp=2)
    return {"hf": hf, "mcore": mcore}


def _eval(model: Path, out: Path, *extra: str) -> dict:
    args = ["eval", "--model", str(model), "--tasks", "cmmlu", "--data-dir", str(DEMO), "--limit", "3",
            "--shots", "1", "--device", "cpu", "--output", str(out), "--log-samples", *extra]
    if "--nproc-per-node" in extra:
        # torchrun's agent runs in its own process: inside the test process it inherits pytest's state.
        proc = subprocess.run([sys.executable, "-m", "llamatron.cli.main", *args], capture_output=True, text=True,
                              timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert main(args) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def _same(a: dict, b: dict) -> None:
    assert a["results"] == b["results"]
    assert len(a["samples"]) == len(b["samples"]) == 12
    for x, y in zip(a["samples"], b["samples"], strict=True):
        assert (x["subject"], x["index"], x["answer"]) == (y["subject"], y["index"], y["answer"])
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-5)


def test_hf_and_megatron_tp2_pp2_give_the_same_results(checkpoints, tmp_path):
    hf = _eval(checkpoints["hf"], tmp_path / "hf.json")
    mcore = _eval(checkpoints["mcore"], tmp_path / "mcore.json")
    _same(hf, mcore)
    assert set(hf["results"]) == {"cmmlu", *(f"cmmlu_{p.stem}" for p in (DEMO / "test").glob("*.csv"))}
    assert hf["results"]["cmmlu"]["n"] == 12


@pytest.mark.slow
def test_two_gloo_processes_equal_one(checkpoints, tmp_path):
    one = _eval(checkpoints["hf"], tmp_path / "one.json", "--batch-size", "2")
    two = _eval(checkpoints["hf"], tmp_path / "two.json", "--batch-size", "2", "--nproc-per-node", "2")
    _same(one, two)
    assert two["config"]["world_size"] == 2


def test_bad_input_is_one_clear_line(checkpoints, tmp_path, capsys):
    def fails(*args: str) -> str:
        assert main(["eval", *args]) == 2
        return capsys.readouterr().err

    common = ["--data-dir", str(DEMO), "--device", "cpu"]
    assert "unknown task 'mmlu'" in fails("--model", str(checkpoints["hf"]), "--tasks", "mmlu", *common)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    err = fails("--model", str(tmp_path / "junk"), "--tasks", "cmmlu", *common)
    assert "not a model directory of a known format" in err and "weights.bin" in err
    err = fails("--model", str(checkpoints["hf"]), "--tasks", "cmmlu_anatomy", *common)
    assert "subject 'anatomy'" in err and "elementary_mathematics" in err
    err = fails("--model", str(checkpoints["hf"]), "--tasks", "cmmlu", "--shots", "9", *common)
    assert "--shots 9" in err


def test_perplexity_matches_transformers_loss(checkpoints, tmp_path):
    from transformers import LlamaForCausalLM

    from llamatron.data.indexed import write_documents

    rng = np.random.default_rng(0)
    docs = [[*rng.integers(0, 5000, size=int(n)).tolist(), 128001] for n in (40, 7, 90)]
    prefix = tmp_path / "corpus_text_document"
    write_documents(prefix, docs, dtype=np.int32)
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", str(checkpoints["hf"]), "--data-path", str(prefix), "--seq-len", "32",
                 "--batch-size", "2", "--device", "cpu", "--output", str(out)]) == 0
    got = json.loads(out.read_text())["results"]

    tokens = torch.tensor([t for d in docs for t in d])
    reference = LlamaForCausalLM.from_pretrained(checkpoints["hf"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, 32):  # windows of 33 tokens overlapping by one
        window = tokens[start : start + 33][None]
        with torch.no_grad():
            loss = reference(window, labels=window).loss  # mean over window length - 1 predictions
        total += float(loss) * (window.shape[1] - 1)
        count += window.shape[1] - 1
    assert got["tokens"] == count == len(tokens) - 1
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
