"""`llamatron preprocess-sft` on the bundled demo set: the idxmap it writes reads back as the raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llamatron.cli.main import main
from llamatron.data.sft import build_sft_dataset
from llamatron.data.sft_idxmap import SFTIdxmap

DEMO = Path(__file__).resolve().parents[2] / "src" / "llamatron" / "assets" / "sft" / "demo_alpaca.jsonl"


def test_preprocess_sft_packed_matches_raw(tmp_path, capsys):
    prefix = str(tmp_path / "demo")
    assert main(["preprocess-sft", "--input", str(DEMO), "--output-prefix", prefix, "--seq-len", "256", "--packing"]) == 0
    out = capsys.readouterr().out
    assert "60 records (alpaca)" in out and "train with dataset prefix" in out
    idxmap = SFTIdxmap(prefix + "_text_document")
    summary = json.loads(Path(prefix + "_text_document.sft.json").read_text())
    assert summary["samples"] == 60 and summary["rows"] == len(idxmap) < 60
    raw = build_sft_dataset(DEMO, seq_len=256, packing=True, seed=5, cache_dir=tmp_path / "cache")
    mapped = build_sft_dataset(prefix, fmt="idxmap", seq_len=256, seed=5)
    assert len(raw) == len(mapped)
    for i in range(len(raw)):
        assert all(np.array_equal(raw[i][k], mapped[i][k]) for k in ("tokens", "labels", "positions", "document_ids"))
    assert sum(len(idxmap[i].sample_lengths) for i in range(len(idxmap))) == 60
    # Refuses to overwrite without --force.
    assert main(["preprocess-sft", "--input", str(DEMO), "--output-prefix", prefix, "--seq-len", "256"]) == 2
    assert "already exist" in capsys.readouterr().err


def test_preprocess_sft_bad_records(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n{"instruction": "d", "output": ""}\n')
    args = ["preprocess-sft", "--input", str(bad), "--output-prefix", str(tmp_path / "o"), "--seq-len", "64"]
    assert main(args) == 2
    assert "line 2: missing field 'output'" in capsys.readouterr().err
    assert main([*args, "--on-error", "skip"]) == 0
    assert "skipped 1 empty output, 1 missing field" in capsys.readouterr().out


def test_data_show_marks_masked_spans(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLAMATRON_CACHE", str(tmp_path / "cache"))
    prefix = str(tmp_path / "demo")
    assert main(["preprocess-sft", "--input", str(DEMO), "--output-prefix", prefix, "--seq-len", "128", "--packing"]) == 0
    capsys.readouterr()
    # An idxmap written by preprocess-sft is recognised as SFT data without --kind.
    assert main(["data", "show", "--data-path", prefix + "_text_document", "--seq-len", "128", "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert "⟦<|begin_of_text|><|start_header_id|>user<|end_header_id|>" in out
    assert "<|eot_id|>⟧<|start_header_id|>assistant<|end_header_id|>" in out
    assert main(["data", "show", "--data-path", str(DEMO), "--seq-len", "128", "--count", "1", "--json", "--cache-dir", ""]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    raw = build_sft_dataset(DEMO, seq_len=128, seed=1234, cache_dir=tmp_path / "cache")[0]
    assert all(item[k] == raw[k].tolist() for k in raw)
