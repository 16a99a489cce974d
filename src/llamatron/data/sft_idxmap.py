"""The seed's SFT idxmap: a Megatron indexed dataset whose every document is one training row.

Layout, as Pai-Megatron-Patch's toolkits/sft_data_preprocessing writes it and its
megatron_patch/data/utils.py (get_batch_on_this_tp_rank_idxmap_sft) reads it:

- A document (one sequence) holds 2S signed ids: `tokens[S] ++ labels[S]`, S the training sequence
  length. Stored as int32 (Llama 3's vocabulary needs it; negative values need a signed type).
- Labels are pre-shifted: labels[i] is the target the model must predict *at* position i, i.e. the
  next token tokens[i+1] where that token is trained, and -100 where nothing is learned (prompt
  tokens, the last token of each sample, padding). The training step does no shifting: the loss is
  cross_entropy(logits[i], labels[i]).
- Samples are concatenated from position 0 (several when packed, one otherwise); the last token of
  every sample is stored as `-1 - id` (always negative, as ids are >= 0). The rest of the row is
  padding: the pad id (not negated) in tokens and -100 in labels.

Reading a row back: a negative token closes a sample (and is restored as `-1 - stored`); positions
restart at 0 after it and the document id increases by one; what follows the last marker is the
padding tail, a document of its own. Pai-Megatron-Patch derives the same positions (resetting after
each negative token) and builds its varlen cu_seqlens from the zeros of those positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llamatron.data.indexed import IndexedDataset, IndexedDatasetWriter, data_paths
from llamatron.data.packing import PackedRow
from llamatron.errors import LlamatronError

# Pai-Megatron-Patch writes the json key "text" with level "document": {prefix}_text_document.{bin,idx}.
IDXMAP_SUFFIX = "_text_document"


def encode_row(row: PackedRow) -> np.ndarray:
    """One row as the stored document: tokens with end-of-sample markers, then labels. (2S,) int32."""
    tokens = row.tokens.astype(np.int64).copy()
    ends = np.cumsum(row.sample_lengths) - 1
    assert (tokens[ends] >= 0).all()
    tokens[ends] = -1 - tokens[ends]
    return np.concatenate([tokens, row.labels]).astype(np.int32)


def decode_row(document: np.ndarray, *, where: str = "row") -> PackedRow:
    """Inverse of encode_row; also reads rows written by Pai-Megatron-Patch."""
    if len(document) % 2:
        raise LlamatronError(f"{where}: SFT idxmap rows hold tokens[S] ++ labels[S], but this one has odd length {len(document)}")
    seq_len = len(document) // 2
    tokens = np.asarray(document[:seq_len], dtype=np.int64).copy()
    labels = np.asarray(document[seq_len:], dtype=np.int64).copy()
    ends = np.flatnonzero(tokens < 0)
    tokens[ends] = -1 - tokens[ends]
    lengths = np.diff(np.concatenate([[-1], ends])).tolist()
    return PackedRow(tokens=tokens, labels=labels, sample_lengths=tuple(int(n) for n in lengths))


def write_sft_idxmap(prefix: str | Path, rows: Iterable[PackedRow]) -> int:
    """Write rows as an SFT idxmap at `prefix` (P.bin/P.idx, atomically); returns the row count."""
    count = 0
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for row in rows:
            writer.add_document(encode_row(row))
            count += 1
    return count


class SFTIdxmap:
    """Memory-mapped reader: `len()` rows, `idxmap[i] -> PackedRow`, `seq_len` S."""

    def __init__(self, prefix: str | Path) -> None:
        idx_path, _ = data_paths(prefix)
        if not idx_path.exists() and Path(str(prefix) + IDXMAP_SUFFIX + ".idx").exists():
            prefix = str(prefix) + IDXMAP_SUFFIX  # the prefix given to preprocess-sft, not the file prefix
        self.dataset = IndexedDataset(prefix)
        self.prefix = self.dataset.prefix
        if not np.issubdtype(self.dataset.dtype, np.signedinteger):
            raise LlamatronError(
                f"{self.prefix}: stored as {self.dataset.dtype}, which cannot hold the -100 labels and -1-id "
                f"markers of an SFT idxmap; rebuild it with llamatron preprocess-sft (int32)"
            )
        lengths = np.asarray(self.dataset.sequence_lengths)
        if len(lengths) == 0:
            raise LlamatronError(f"{self.prefix}: the SFT idxmap holds no rows; rebuild it from a non-empty input")
        if (lengths != lengths[0]).any() or lengths[0] % 2:
            raise LlamatronError(
                f"{self.prefix}: rows have lengths {sorted(set(lengths.tolist()))[:5]}; an SFT idxmap has one "
                f"length 2S throughout (is this a pretraining dataset?)"
            )
        self.seq_len = int(lengths[0]) // 2

    def __len__(self) -> int:
        return self.dataset.sequence_count

    def __getitem__(self, i: int) -> PackedRow:
        return decode_row(self.dataset.get(i), where=f"{self.prefix} row {i}")
