"""Records -> Llama 3.1 chat ids and labels, end to end against Meta's reference encoder; caching;
the dataset's shuffling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamatron.data import sft
from llamatron.data.packing import IGNORE_INDEX
from llamatron.data.sft import (
    SFTDataset,
    SFTOptions,
    build_sft_dataset,
    encode_records,
    encode_records_cached,
)
from llamatron.data.sft_records import load_records

HEADER_TOKENS = 4  # <|start_header_id|> assistant <|end_header_id|> \n\n, the reference's generation prompt

RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "翻译成英文", "input": "你好，世界", "output": "Hello, world.", "system": "You translate."},
    {"instruction": "And now?", "output": "Still here.", "history": [["Are you there?", "Yes."], ["Sure?", "Sure."]]},
    {"instruction": "Multi", "output": "Turn", "system": "S", "history": [["a", "b"]]},
]


@pytest.fixture(scope="module")
def tok():
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="module")
def reference():
    """Meta's llama_models encoder: ids of a dialog (without its trailing generation prompt)."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    chat = ChatFormat(Tokenizer.get_instance())

    def encode(messages):
        tokens = chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in messages]).tokens
        assert tokens[-HEADER_TOKENS:] == [128006, 78191, 128007, 271]
        return tokens[:-HEADER_TOKENS]

    return encode


def reference_labels(messages, encode, *, turns="all"):
    """Pre-shifted labels from the reference alone: message k spans [len(prefix_k), len(prefix_k+1))."""
    ids = encode(messages)
    trained = np.zeros(len(ids), bool)
    spans = [(len(encode(messages[:k])) if k else 1, len(encode(messages[: k + 1])))
             for k, m in enumerate(messages) if m["role"] == "assistant"]
    for start, end in spans if turns == "all" else spans[-1:]:
        trained[start:end] = True
    labels = np.full(len(ids), IGNORE_INDEX)
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return ids, labels


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.mark.parametrize("turns", ["all", "last"])
def test_records_to_ids_and_labels_match_reference(tmp_path, tok, reference, turns):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    options = SFTOptions(seq_len=512, train_turns=turns)
    samples = encode_records(path, tokenizer=tok, options=options)
    records = load_records(path).records
    assert len(samples) == len(RECORDS)
    for k, record in enumerate(records):
        ids, labels = samples.sample(k)
        ref_ids, ref_labels = reference_labels(list(record.messages), reference, turns=turns)
        assert ids.tolist() == ref_ids, k
        assert labels.tolist() == ref_labels.tolist(), k


def test_seed_default_system_and_train_on_prompt(tmp_path, tok, reference):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS[:1])
    ids, labels = encode_records(path, tokenizer=tok, options=SFTOptions(seq_len=512, default_system=True)).sample(0)
    system = {"role": "system", "content": "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"}
    assert ids.tolist() == reference([system, *load_records(path).records[0].messages])
    ids, labels = encode_records(path, tokenizer=tok, options=SFTOptions(seq_len=512, train_on_prompt=True)).sample(0)
    assert labels[:-1].tolist() == ids[1:].tolist() and labels[-1] == IGNORE_INDEX


def test_overlong_samples_dropped_or_truncated(tmp_path, tok):
    long = {"instruction": "Count.", "output": " ".join(str(i) for i in range(200))}
    path = write_jsonl(tmp_path / "r.jsonl", [RECORDS[0], long])
    dropped = encode_records(path, tokenizer=tok, options=SFTOptions(seq_len=64))
    assert len(dropped) == 1 and dropped.stats["dropped_too_long"] == 1
    full, _ = encode_records(path, tokenizer=tok, options=SFTOptions(seq_len=1024)).sample(1)
    cut = encode_records(path, tokenizer=tok, options=SFTOptions(seq_len=64, truncate=True))
    assert len(cut) == 2 and cut.stats["truncated"] == 1
    ids, labels = cut.sample(1)
    assert ids.tolist() == full[:64].tolist() and labels[-1] == IGNORE_INDEX and labels[-2] == ids[-1]
    assert "1 dropped as longer than seq_len" in sft.summary_line(dropped.stats)


def test_cache_is_reused_and_verified(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    options = SFTOptions(seq_len=256)
    first = encode_records_cached(path, tokenizer=tok, options=options, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    calls = []
    real = sft.encode_records
    monkeypatch.setattr(sft, "encode_records", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = encode_records_cached(path, tokenizer=tok, options=options, cache_dir=tmp_path / "cache")
    assert calls == [] and again.ids.tolist() == first.ids.tolist() and again.stats == first.stats
    cache_file.write_bytes(cache_file.read_bytes()[:-100])  # a damaged cache is rebuilt, not trusted
    rebuilt = encode_records_cached(path, tokenizer=tok, options=options, cache_dir=tmp_path / "cache")
    assert calls == [1] and rebuilt.labels.tolist() == first.labels.tolist()
    # Other options or other input bytes: another key.
    encode_records_cached(path, tokenizer=tok, options=SFTOptions(seq_len=256, train_turns="last"), cache_dir=tmp_path / "cache")
    assert calls == [1, 1]


def test_dataset_shuffle_is_deterministic_and_epoch_wise(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS * 3)
    make = lambda seed: build_sft_dataset(path, tokenizer=tok, seq_len=128, seed=seed, cache_dir=tmp_path / "c")  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    n = len(a)
    assert n == 12
    order = [a.row_index(i) for i in range(2 * n)]
    assert order == [b.row_index(i) for i in range(2 * n)]
    assert order != [c.row_index(i) for i in range(2 * n)]
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n)) and order[:n] != order[n:]
    item = a[5]
    assert set(item) == {"tokens", "labels", "positions", "document_ids"}
    assert all(v.shape == (128,) for v in item.values())
    assert (item["tokens"][item["document_ids"] == 1] == tok.pad_id).all()  # the padding tail
    with pytest.raises(Exception, match="no rows"):
        SFTDataset([])


def test_render_row_marks_masked_spans(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS[:2])
    (text,) = sft.show_rows(path, tokenizer=tok, count=1, seq_len=64, packing=True)
    plain = text.plain
    assert "2 sample(s)" in plain
    assert "⟦<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>⟧" in plain
    assert "⟧<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>\n" in plain
    assert f"[padding] ⟦id {tok.pad_id} ×" in plain
