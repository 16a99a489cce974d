"""Megatron's MMIDIDX indexed dataset (`P.bin` + `P.idx`): a memory-mapped reader and an atomic writer.

Layout (little-endian), byte-compatible with megatron-core's IndexedDataset:
  .idx  b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence_count | <Q document_count
        | int32[sequence_count] lengths | int64[sequence_count] byte pointers into .bin
        | int64[document_count] document indices (sequence index where each document starts, then the total)
  .bin  every sequence's tokens, concatenated, no header.
A "document" is a run of sequences; preprocessing writes one sequence per document, and an empty
document has no sequence at all (its document index repeats the previous one), as Megatron writes it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llamatron.checkpoint.atomic import atomic_write_bytes
from llamatron.errors import LlamatronError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

# Megatron's DType enum: the code stored in the header byte.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


def dtype_code(dtype: np.dtype | type) -> int:
    """The header code of a numpy dtype; only Megatron's eight dtypes exist in the format."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise LlamatronError(f"dtype {dtype} cannot be stored in a Megatron indexed dataset; use one of {names}")
    return _CODE_OF[dtype]


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 when every id fits with room to spare, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def data_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(P.idx, P.bin) for a dataset prefix; a prefix given with its suffix is accepted too."""
    prefix = str(prefix)
    for suffix in (".idx", ".bin"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return Path(prefix + ".idx"), Path(prefix + ".bin")


class IndexedDataset:
    """Read-only, zero-copy view of a Megatron indexed dataset.

    `len(ds)` and `ds[i]` are per *document* (an empty document reads as an empty array);
    `get(i, offset, length)` reads part of *sequence* i, Megatron's unit and the GPT sampler's.
    Arrays returned are read-only views of the memory map; copy before changing them."""

    def __init__(self, prefix: str | Path) -> None:
        self.idx_path, self.bin_path = data_paths(prefix)
        self.prefix = str(self.idx_path)[: -len(".idx")]
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise LlamatronError(
                    f"indexed dataset file {path} does not exist; pass the prefix P of P.bin/P.idx "
                    f"(e.g. out/corpus_text_document)"
                )
        self._read_index()
        self._map_tokens()

    def _read_index(self) -> None:
        idx_size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise LlamatronError(
                f"{self.idx_path} is not a Megatron MMIDIDX index (bad magic {header[:9]!r}); "
                f"check that the path points at a .idx written by Megatron or llamatron preprocess"
            )
        version, code, sequence_count, document_count = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise LlamatronError(f"{self.idx_path}: index version {version} is not supported (only version 1)")
        if code not in DTYPE_CODES:
            raise LlamatronError(
                f"{self.idx_path}: unknown dtype code {code} in the header (known: 1-8); the file is corrupt"
            )
        expected = HEADER_BYTES + sequence_count * (4 + 8) + document_count * 8
        if idx_size != expected:
            raise LlamatronError(
                f"{self.idx_path} holds {idx_size} bytes but its header ({sequence_count} sequences, "
                f"{document_count} document indices) needs {expected}; the index is truncated or corrupt"
            )
        self.dtype = DTYPE_CODES[code]
        self.sequence_count = sequence_count
        self.document_count = document_count
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r") if idx_size else np.zeros(0, np.uint8)
        self._idx_map = idx
        offset = HEADER_BYTES
        # (sequence_count,) int32 token counts, then (sequence_count,) int64 byte offsets into .bin
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=sequence_count, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=sequence_count, offset=offset)
        offset += self.sequence_pointers.nbytes
        # (document_count,) sequence index where each document starts; the last entry is sequence_count
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=document_count, offset=offset)
        if document_count == 0 or self.document_indices[-1] != sequence_count or self.document_indices[0] != 0:
            raise LlamatronError(
                f"{self.idx_path}: document indices do not run from 0 to {sequence_count} sequences; "
                f"the index is corrupt"
            )

    def _map_tokens(self) -> None:
        bin_size = self.bin_path.stat().st_size
        itemsize = self.dtype.itemsize
        needed = 0
        if self.sequence_count:
            needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        if bin_size != needed:
            raise LlamatronError(
                f"{self.bin_path} holds {bin_size} bytes but {self.idx_path} describes {needed}; "
                f"the .bin is truncated or belongs to another index -- re-run preprocessing"
            )
        if bin_size:
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.zeros(0, dtype=self.dtype)

    # Documents (what preprocessing wrote, one per input record).
    def __len__(self) -> int:
        return self.document_count - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
        first, last = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if first == last:
            return self._tokens[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        stop = int(self.sequence_pointers[last - 1]) // self.dtype.itemsize + int(self.sequence_lengths[last - 1])
        return self._tokens[start:stop]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    # Sequences (Megatron's unit for GPT sampling).
    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (to its end when length is None)."""
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        assert offset >= 0 and offset + length <= seq_len, (i, offset, length, seq_len)
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin, in order (a memory map)."""
        return self._tokens


class IndexedDatasetWriter:
    """Write a Megatron indexed dataset; `P.bin`/`P.idx` appear only when the `with` block ends cleanly.

        with IndexedDatasetWriter("out/corpus_text_document", dtype=np.int32) as writer:
            writer.add_document([128000, 791, 128001])
    """

    def __init__(self, prefix: str | Path, *, dtype: np.dtype | type) -> None:
        self.idx_path, self.bin_path = data_paths(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._lengths = array("i")  # int32 per sequence, compact for 10^8 entries
        self._document_indices = array("q", [0])
        self._bin: BinaryIO | None = None
        self._tmp_bin: str | None = None

    def __enter__(self) -> IndexedDatasetWriter:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp_bin = tempfile.mkstemp(prefix=f".{self.bin_path.name}.tmp-", dir=self.bin_path.parent)
        self._bin = os.fdopen(fd, "wb", buffering=1 << 22)
        return self

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append one document: one sequence of `tokens`, or sequences of `lengths` summing to it.
        An empty document gets no sequence, as Megatron's preprocessing writes it."""
        arr = np.asarray(tokens, dtype=self.dtype)
        if lengths is None:
            lengths = [len(arr)] if len(arr) else []
        assert sum(lengths) == len(arr), "sequence lengths must add up to the document's tokens"
        assert self._bin is not None, "use IndexedDatasetWriter as a context manager"
        self._bin.write(arr.tobytes())
        self._lengths.extend(lengths)
        self._document_indices.append(len(self._lengths))

    def add_documents(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` concatenated, `doc_lengths` each's size
        (0 for an empty document). The fast path for preprocessing."""
        assert self._bin is not None, "use IndexedDatasetWriter as a context manager"
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        assert int(doc_lengths.sum()) == len(tokens)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        nonempty = doc_lengths > 0
        self._lengths.frombytes(doc_lengths[nonempty].astype(np.int32).tobytes())
        starts = len(self._lengths) - int(nonempty.sum()) + np.cumsum(nonempty)
        self._document_indices.frombytes(starts.astype(np.int64).tobytes())

    def add_dataset(self, other: IndexedDataset) -> None:
        """Append every document of another dataset (same dtype), keeping its sequence boundaries."""
        if other.dtype != self.dtype:
            raise LlamatronError(f"cannot merge {other.prefix} (dtype {other.dtype}) into a {self.dtype} dataset")
        assert self._bin is not None, "use IndexedDatasetWriter as a context manager"
        base = len(self._lengths)
        tokens = other.tokens
        step = 1 << 26  # copy the memory map in 64M-token slices to bound page-cache pressure
        for start in range(0, len(tokens), step):
            self._bin.write(np.asarray(tokens[start : start + step]).tobytes())
        self._lengths.frombytes(np.asarray(other.sequence_lengths, dtype=np.int32).tobytes())
        self._document_indices.frombytes((np.asarray(other.document_indices[1:]) + base).astype(np.int64).tobytes())

    @property
    def document_count(self) -> int:
        return len(self._document_indices) - 1

    def _index_bytes(self) -> bytes:
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        # Byte offset of each sequence: exclusive prefix sum of its size in bytes.
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        header = MAGIC + struct.pack("<QBQQ", VERSION, self._code, len(lengths), len(self._document_indices))
        return b"".join([header, lengths.tobytes(), pointers.tobytes(), self._document_indices.tobytes()])

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._bin is not None and self._tmp_bin is not None
        try:
            if exc_type is None:
                self._bin.flush()
                os.fsync(self._bin.fileno())
            self._bin.close()
            if exc_type is not None:
                return
            # mkstemp creates 0600 files; datasets are shared, so give them the usual umask mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp_bin, 0o666 & ~umask)
            # .bin first: a reader never finds a new .idx next to an old or partial .bin.
            os.replace(self._tmp_bin, self.bin_path)
            self._tmp_bin = None
            atomic_write_bytes(self.idx_path, self._index_bytes())
            os.chmod(self.idx_path, 0o666 & ~umask)
        finally:
            if self._tmp_bin is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp_bin)


def write_documents(prefix: str | Path, documents: Sequence[Sequence[int]], *, dtype: np.dtype | type) -> None:
    """Write a list of token lists as an indexed dataset (one sequence per non-empty document)."""
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
