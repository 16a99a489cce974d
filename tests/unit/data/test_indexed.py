"""Megatron MMIDIDX reader/writer against files megatron-core wrote (shared/testdata/megatron_idx)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from llamatron.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    optimal_dtype,
    write_documents,
)
from llamatron.errors import LlamatronError

VECTORS = [("llama3_int32", np.int32), ("small_uint16", np.uint16)]


def _documents(shared_dir, name):
    return json.loads((shared_dir / "testdata" / "megatron_idx" / f"{name}.json").read_text())["documents"]


@pytest.mark.parametrize(("name", "dtype"), VECTORS)
def test_writer_is_byte_identical_to_megatron(shared_dir, tmp_path, name, dtype):
    docs = _documents(shared_dir, name)
    assert any(len(d) == 0 for d in docs), "the vectors include an empty document"
    write_documents(tmp_path / "out", docs, dtype=dtype)
    for suffix in (".bin", ".idx"):
        expected = (shared_dir / "testdata" / "megatron_idx" / f"{name}{suffix}").read_bytes()
        assert (tmp_path / f"out{suffix}").read_bytes() == expected, suffix


@pytest.mark.parametrize(("name", "dtype"), VECTORS)
def test_batched_writer_is_byte_identical(shared_dir, tmp_path, name, dtype):
    docs = _documents(shared_dir, name)
    lengths = np.array([len(d) for d in docs])
    flat = np.array([t for d in docs for t in d], dtype=np.int64)
    cut = int(lengths[:6].sum())
    with IndexedDatasetWriter(tmp_path / "out", dtype=dtype) as writer:
        writer.add_documents(flat[:cut], lengths[:6])
        writer.add_documents(flat[cut:], lengths[6:])
    for suffix in (".bin", ".idx"):
        expected = (shared_dir / "testdata" / "megatron_idx" / f"{name}{suffix}").read_bytes()
        assert (tmp_path / f"out{suffix}").read_bytes() == expected, suffix


@pytest.mark.parametrize(("name", "dtype"), VECTORS)
def test_reader_returns_megatron_documents(shared_dir, name, dtype):
    docs = _documents(shared_dir, name)
    ds = IndexedDataset(shared_dir / "testdata" / "megatron_idx" / name)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs) and ds.document_count == len(docs) + 1
    assert ds.sequence_count == sum(1 for d in docs if d)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    nonempty = [d for d in docs if d]
    assert ds.sequence_lengths.tolist() == [len(d) for d in nonempty]
    assert ds.get(1, offset=3, length=4).tolist() == nonempty[1][3:7]
    assert ds.get(1, offset=3).tolist() == nonempty[1][3:]


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_every_dtype_code_round_trips(tmp_path, code):
    dtype = DTYPE_CODES[code]
    docs = [np.arange(5, dtype=dtype), np.zeros(0, dtype=dtype), np.array([1, 2, 3], dtype=dtype)]
    with IndexedDatasetWriter(tmp_path / "d", dtype=dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.add_document(np.array([7, 8, 9, 10], dtype=dtype), lengths=[1, 3])  # two sequences
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and raw[17] == code
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == dtype and len(ds) == 4 and ds.sequence_count == 4
    assert [ds[i].tolist() for i in range(3)] == [d.tolist() for d in docs]
    assert ds[3].tolist() == [7, 8, 9, 10] and ds.get(3).tolist() == [8, 9, 10]
    assert ds.document_indices.tolist() == [0, 1, 1, 2, 4]


def test_merge_keeps_documents(tmp_path):
    write_documents(tmp_path / "a", [[1, 2], [], [3]], dtype=np.int32)
    write_documents(tmp_path / "b", [[4, 5, 6]], dtype=np.int32)
    with IndexedDatasetWriter(tmp_path / "m", dtype=np.int32) as writer:
        writer.add_dataset(IndexedDataset(tmp_path / "a"))
        writer.add_dataset(IndexedDataset(tmp_path / "b"))
    write_documents(tmp_path / "ref", [[1, 2], [], [3], [4, 5, 6]], dtype=np.int32)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"m{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", dtype=np.int32) as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_optimal_dtype():
    assert optimal_dtype(128256) == np.int32 and optimal_dtype(32000) == np.uint16


# ---------------------------------------------------------------- bad input
@pytest.fixture
def good(tmp_path):
    write_documents(tmp_path / "g", [[1, 2, 3], [4, 5]], dtype=np.int32)
    return tmp_path / "g"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-4]), "truncated"),
        (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes() + b"\0" * 4), "describes"),
        (lambda p: _patch(p.with_suffix(".idx"), 0, b"XXIDIDX"), "bad magic"),
        (lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)), "version 2"),
        (lambda p: _patch(p.with_suffix(".idx"), 17, bytes([9])), "unknown dtype code 9"),
        (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-8]), "truncated or corrupt"),
        (lambda p: p.with_suffix(".bin").unlink(), "does not exist"),
    ],
)
def test_bad_files_raise_one_clear_error(good, damage, message):
    damage(good)
    with pytest.raises(LlamatronError, match=message):
        IndexedDataset(good)


def test_megatron_core_reads_our_files(tmp_path):
    """megatron-core's own reader agrees with ours (skipped only when megatron-core is not installed)."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    docs = [[5, 6, 7], [], [128001], list(range(100))]
    write_documents(tmp_path / "d", docs, dtype=np.int32)
    theirs = mcore.IndexedDataset(str(tmp_path / "d"))
    nonempty = [d for d in docs if d]
    assert len(theirs) == len(nonempty)
    assert [theirs[i].tolist() for i in range(len(theirs))] == nonempty
    assert theirs.document_indices.tolist() == [0, 1, 1, 2, 3]
