"""`llamatron preprocess` and `llamatron preprocess merge` as users type them."""

from __future__ import annotations

import json

from llamatron.cli.main import main
from llamatron.data.indexed import IndexedDataset


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    return str(path)


def test_preprocess_several_inputs_then_merge(tmp_path, capsys):
    from llamatron.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    a = _jsonl(tmp_path / "a.jsonl", ["first doc", "second doc"])
    b = _jsonl(tmp_path / "b.jsonl", ["third doc"])
    out = str(tmp_path / "corpus")
    rc = main(["preprocess", "--input", a, b, "--output-prefix", out, "--json-key", "content", "--append-eod",
               "--workers", "2", "--tokenizer", "llama3"])
    assert rc == 0
    assert "3 documents" in capsys.readouterr().out
    ds = IndexedDataset(f"{out}_content_document")
    assert [ds[i].tolist() for i in range(3)] == [tok.encode(t) + [tok.eos_id] for t in ["first doc", "second doc", "third doc"]]

    rc = main(["preprocess", "merge", "--inputs", f"{out}_content_document", f"{out}_content_document",
               "--output-prefix", str(tmp_path / "merged")])
    assert rc == 0
    merged = IndexedDataset(tmp_path / "merged")
    assert len(merged) == 6 and merged[3].tolist() == ds[0].tolist()


def test_preprocess_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    assert main(["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "o"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamatron: error: ") and "bad.jsonl:2" in err and err.count("\n") == 1
    assert main(["preprocess", "--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
