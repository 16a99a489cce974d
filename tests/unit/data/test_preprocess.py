"""Preprocessing: every input format, the tokens against the Llama 3 tokenizer and megatron-core's
reader, worker-count independence, and one clear error per kind of bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from llamatron.data.indexed import IndexedDataset
from llamatron.data.preprocess import PreprocessConfig, merge, preprocess
from llamatron.errors import LlamatronError

TEXTS = ["Hello world.", "", "混合的中文 and English 文本。", "special <|eot_id|> stays text", "x" * 300]


@pytest.fixture(scope="module")
def tok():
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


def _expected(tok, texts, *, bos=False, eod=True):
    out = []
    for text in texts:
        ids = ([tok.bos_id] if bos else []) + tok.encode(text)
        out.append(ids + [tok.eos_id] if ids and eod else ids)
    return out


def _jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "gz", "zst", "parquet"])
def test_formats_give_llama3_tokens(tmp_path, tok, fmt):
    if fmt == "jsonl":
        path = _jsonl(tmp_path / "in.jsonl", TEXTS)
    elif fmt == "json":
        path = tmp_path / "in.json"
        path.write_text(json.dumps([{"text": t} for t in TEXTS], ensure_ascii=False))
    elif fmt == "gz":
        path = tmp_path / "in.jsonl.gz"
        path.write_bytes(gzip.compress(_jsonl(tmp_path / "raw.jsonl", TEXTS).read_bytes()))
    elif fmt == "zst":
        zstandard = pytest.importorskip("zstandard")
        path = tmp_path / "in.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(tmp_path / "raw.jsonl", TEXTS).read_bytes()))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": TEXTS}), path)
    stats = preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "out"), append_eod=True, workers=1))
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert ds.dtype == np.int32 and stats.documents == len(TEXTS)
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(tok, TEXTS)


def test_workers_keep_order_and_bos(tmp_path, tok, monkeypatch):
    import llamatron.data.readers as readers

    monkeypatch.setattr(readers, "BATCH_BYTES", 64)  # many small batches across the workers
    texts = [f"document {i} " * (i % 7) for i in range(200)]
    path = _jsonl(tmp_path / "in.jsonl", texts)
    for workers in (1, 2):
        preprocess(PreprocessConfig(inputs=[path, path], output_prefix=str(tmp_path / f"w{workers}"),
                                    add_bos=True, append_eod=True, workers=workers))
    assert (tmp_path / "w1_text_document.bin").read_bytes() == (tmp_path / "w2_text_document.bin").read_bytes()
    ds = IndexedDataset(tmp_path / "w2_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(tok, texts + texts, bos=True)


def test_megatron_core_reads_preprocessed_tokens(tmp_path, tok):
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    path = _jsonl(tmp_path / "in.jsonl", TEXTS)
    preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "out"), append_eod=True, workers=1))
    theirs = mcore.IndexedDataset(str(tmp_path / "out_text_document"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [e for e in _expected(tok, TEXTS) if e]


def test_merge(tmp_path, tok):
    a = _jsonl(tmp_path / "a.jsonl", TEXTS[:2])
    b = _jsonl(tmp_path / "b.jsonl", TEXTS[2:])
    for name, path in (("a", a), ("b", b)):
        preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / name), workers=1))
    merge([str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")], str(tmp_path / "m"))
    ds = IndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(tok, TEXTS, eod=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": "broken\n', r"in\.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n{"body": "no key"}\n', r"in\.jsonl:2: key 'text' missing"),
        ('{"text": 5}\n', r"in\.jsonl:1: key 'text' holds a int"),
        ("", "holds no records"),
        ("\n\n", "holds no records"),
    ],
)
def test_bad_records_fail_with_line_number(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(LlamatronError, match=message):
        preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "out"), workers=1))
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_skip_reports_bad_records(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n')
    stats = preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "o"), workers=1, on_error="skip"))
    assert stats.documents == 2 and stats.skipped == 2
    assert "in.jsonl:2: malformed JSON" in stats.skipped_examples[0]
    assert "in.jsonl:3: key 'text' missing" in stats.skipped_examples[1]


def test_missing_input_and_bad_merge(tmp_path):
    with pytest.raises(LlamatronError, match="does not exist"):
        preprocess(PreprocessConfig(inputs=[tmp_path / "nope.jsonl"], output_prefix=str(tmp_path / "o")))
    with pytest.raises(LlamatronError, match="does not exist"):
        merge([str(tmp_path / "missing")], str(tmp_path / "m"))


def test_the_preprocess_tools_and_their_workers_never_import_torch():
    # Each worker process imports llamatron.data.preprocess and builds the tokenizer: importing torch there
    # cost ~1.5 s of start-up per run (and the CLI's main process paid it too).
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    probe = (
        "import sys\n"
        "import llamatron.cli.preprocess, llamatron.cli.preprocess_sft\n"
        "from llamatron.data.preprocess import _tokenizer\n"
        "_tokenizer('llama3')\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
