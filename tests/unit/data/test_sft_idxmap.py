"""SFT idxmap: round trip, raw == idxmap batches, and rows laid out as Pai-Megatron-Patch's tool writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamatron.data.indexed import write_documents
from llamatron.data.packing import IGNORE_INDEX
from llamatron.data.sft import SFTOptions, build_sft_dataset, raw_rows
from llamatron.data.sft_idxmap import SFTIdxmap, encode_row, write_sft_idxmap
from llamatron.errors import LlamatronError


@pytest.fixture(scope="module")
def tok():
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture()
def records_file(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"instruction": f"Question {i}: " + "word " * int(rng.integers(1, 30)),
                "output": "answer " * int(rng.integers(1, 40))} for i in range(25)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("packing", [False, True])
def test_idxmap_round_trip_and_raw_equals_idxmap(tmp_path, tok, records_file, packing):
    options = SFTOptions(seq_len=128, packing=packing)
    rows = raw_rows(records_file, tokenizer=tok, options=options, cache_dir=tmp_path / "c")
    assert write_sft_idxmap(tmp_path / "out", (rows[i] for i in range(len(rows)))) == len(rows)
    idxmap = SFTIdxmap(tmp_path / "out")
    assert len(idxmap) == len(rows) and idxmap.seq_len == 128
    samples = rows.samples
    for i in range(len(rows)):
        got, want = idxmap[i], rows[i]
        assert got.tokens.tolist() == want.tokens.tolist() and got.labels.tolist() == want.labels.tolist()
        assert got.sample_lengths == want.sample_lengths
        start = 0  # every sample's own ids and labels are inside the row, in order
        for k in rows.bins[i]:
            ids, labels = samples.sample(k)
            assert got.tokens[start : start + len(ids)].tolist() == ids.tolist()
            assert got.labels[start : start + len(ids)].tolist() == labels.tolist()
            start += len(ids)
    if packing:
        assert len(rows) < len(samples)
    raw = build_sft_dataset(records_file, tokenizer=tok, seq_len=128, packing=packing, seed=3, cache_dir=tmp_path / "c")
    mapped = build_sft_dataset(tmp_path / "out", fmt="idxmap", seq_len=128, seed=3)
    for i in range(2 * len(raw)):
        a, b = raw[i], mapped[i]
        assert all(np.array_equal(a[key], b[key]) for key in a), i
    with pytest.raises(LlamatronError, match="built with seq_len 128"):
        build_sft_dataset(tmp_path / "out", fmt="idxmap", seq_len=256)


def pai_rows(samples, *, seq_len, pad_id):
    """How Pai-Megatron-Patch's build_idxmap_sft_dataset lays out (prompt ids, full ids) pairs with
    --sequence-packing: labels [-100]*(len(prompt)-1) + full[len(prompt):] + [-100], the last token
    of a sample stored as -1 - id, samples appended in order until the next would overflow, then
    padded with pad_id / -100; each row is tokens ++ labels."""
    rows, tokens, labels = [], [], []
    for prompt, full in samples:
        y = [IGNORE_INDEX] * (len(prompt) - 1) + full[len(prompt):] + [IGNORE_INDEX]
        x = full[:-1] + [-1 - full[-1]]
        if len(tokens) + len(x) > seq_len:
            rows.append(tokens + [pad_id] * (seq_len - len(tokens)) + labels + [IGNORE_INDEX] * (seq_len - len(labels)))
            tokens, labels = [], []
        tokens += x
        labels += y
    rows.append(tokens + [pad_id] * (seq_len - len(tokens)) + labels + [IGNORE_INDEX] * (seq_len - len(labels)))
    return rows


def pai_positions(tokens):
    """Pai-Megatron-Patch's get_ltor_position_ids_packed_seq: positions reset after each negative token."""
    positions = np.arange(len(tokens))
    prev = 0
    for i in np.flatnonzero(np.asarray(tokens) < 0):
        positions[i + 1 :] -= i + 1 - prev
        prev = i + 1
    return positions


def test_reads_pai_megatron_patch_rows(tmp_path):
    samples = [([0, 5, 6], [0, 5, 6, 7, 8]), ([0, 9], [0, 9, 10, 11]), ([0, 12, 13], [0, 12, 13, 14])]
    rows = pai_rows(samples, seq_len=10, pad_id=3)
    write_documents(tmp_path / "pai_text_document", rows, dtype=np.int32)
    idxmap = SFTIdxmap(tmp_path / "pai")  # the prefix given to the tool works as well as the file prefix
    assert len(idxmap) == 2 and idxmap.seq_len == 10
    first = idxmap[0]
    assert first.tokens.tolist() == [0, 5, 6, 7, 8, 0, 9, 10, 11, 3]
    assert first.labels.tolist() == [-100, -100, 7, 8, -100, -100, 10, 11, -100, -100]
    assert first.sample_lengths == (5, 4)
    item = first.item()
    assert item["positions"].tolist() == pai_positions(rows[0][:10]).tolist()
    assert item["document_ids"].tolist() == [0] * 5 + [1] * 4 + [2]
    assert encode_row(first).tolist() == rows[0]  # and written back byte for byte
    second = idxmap[1]
    assert second.sample_lengths == (4,) and second.tokens[:4].tolist() == [0, 12, 13, 14]


def test_refuses_non_sft_dataset(tmp_path):
    write_documents(tmp_path / "pre", [[1, 2, 3], [4, 5]], dtype=np.int32)
    with pytest.raises(LlamatronError, match="one length 2S throughout"):
        SFTIdxmap(tmp_path / "pre")
    write_documents(tmp_path / "u16", [[1, 2, 3, 4]], dtype=np.uint16)
    with pytest.raises(LlamatronError, match="cannot hold the -100 labels"):
        SFTIdxmap(tmp_path / "u16")
