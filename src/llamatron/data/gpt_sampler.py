"""Pretraining samples in Megatron-Core GPTDataset's exact order (megatron-core 0.16.1 semantics).

For one indexed dataset and one split (a contiguous range of its *sequences*):
  document index  every sequence id of the split once per epoch, shuffled by RandomState(seed); when the
                  last epoch is needed for less than 80% of a full one it is shuffled separately.
  sample index    (num_samples + 1, 2) rows (position in the document index, token offset): sample i
                  reads the flattened document stream from row i to row i+1 plus one extra token, so
                  consecutive samples overlap by one token (the last label).
  shuffle index   a permutation of the samples (the final partial epoch again shuffled on its own).
The three arrays come from one RandomState in that order, so the same seed gives Megatron's samples.
Index arrays are cached on disk under a hash of the inputs and settings and verified before reuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamatron.data.indexed import IndexedDataset
from llamatron.errors import LlamatronError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes


# ---------------------------------------------------------------- split string (e.g. "99,1,0")
def parse_split(split: str) -> list[tuple[float, float] | None]:
    """Megatron's split matrix: per split the [begin, end) fraction of the sequences, or None if empty.

    Computed with the same float operations as megatron-core so the rounded boundaries agree."""
    parts = re.findall(r"[.0-9]+", split)
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not weights or len(weights) > 3 or sum(weights) <= 0:
        raise LlamatronError(
            f"split {split!r} does not parse; give up to three non-negative weights for train,valid,test, e.g. 99,1,0"
        )
    weights += [0.0] * (3 - len(weights))
    normalized = (np.array(weights, dtype=np.float64) / np.sum(np.array(weights, dtype=np.float64))).tolist()
    bounds = functools.reduce(lambda acc, w: acc + [acc[-1] + w], normalized, [0])
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def split_range(num_sequences: int, split: str, which: str) -> tuple[int, int] | None:
    """The [begin, end) sequence ids of split `which` ("train"/"valid"/"test"), None when it is empty."""
    bounds = parse_split(split)[split_index(which)]
    if bounds is None:
        return None
    return int(round(bounds[0] * float(num_sequences))), int(round(bounds[1] * float(num_sequences)))


def split_index(which: str) -> int:
    if which not in SPLIT_NAMES:
        raise LlamatronError(f"unknown split {which!r}; use one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES.index(which)


# ---------------------------------------------------------------- the three index arrays
def num_epochs_for(*, tokens_per_epoch: int, num_samples: int | None, seq_len: int, extra: int = 1) -> int:
    """Fewest epochs whose tokens cover num_samples samples of seq_len (+1 extra token at the end)."""
    if num_samples is None:
        return 1
    if tokens_per_epoch <= 0:
        raise LlamatronError("the split holds no tokens; use a larger split share or more data")
    needed = num_samples * seq_len + extra
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, *, separate_final_epoch: bool
) -> np.ndarray:
    """(num_epochs * len(documents),) int32 sequence ids, shuffled (the final epoch apart if asked)."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(documents.astype(np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, separate_final_epoch=False)
    last = build_document_index(documents, 1, rng, separate_final_epoch=False)
    return np.concatenate((first, last))


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    *,
    seq_len: int,
    drop_last_partial: bool = True,
    extra: int = 1,
) -> np.ndarray:
    """(num_samples + 1, 2) rows (document-index position, offset), as Megatron's helpers.cpp computes.

    Sample i starts at token i*seq_len of the flattened stream (samples overlap by the extra token),
    so instead of walking the documents one by one we locate every boundary with a binary search over
    the cumulative document lengths: O(samples * log documents), fine for billions of tokens."""
    doc_sizes = sizes[document_index].astype(np.int64)  # (num_docs_all_epochs,)
    cum_end = np.cumsum(doc_sizes)  # token position where each document ends
    total = int(cum_end[-1]) if len(cum_end) else 0
    if drop_last_partial:
        num_samples = (total - extra) // seq_len
    else:
        # helpers.cpp divides in single precision; kept so the sample count agrees.
        num_samples = int(math.ceil(np.float32(total - extra) / np.float32(seq_len)))
    num_samples = max(num_samples, 0)
    bound = max(len(document_index), int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if bound <= np.iinfo(np.int32).max else np.int64

    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_len  # (num_samples + 1,)
    # With the extra token a boundary sits on the token at `position` (the next sample's first input);
    # without it, on the end of the document that filled the previous sample.
    side = "right" if extra else "left"
    rows = np.searchsorted(cum_end, positions, side=side)
    past_end = rows >= len(cum_end)
    rows_clipped = np.minimum(rows, len(cum_end) - 1)
    offsets = positions - (cum_end[rows_clipped] - doc_sizes[rows_clipped])
    sample_index = np.empty((num_samples + 1, 2), dtype=dtype)
    sample_index[:, 0] = rows_clipped
    sample_index[:, 1] = offsets
    if past_end.any() or (not drop_last_partial and num_samples * seq_len + extra > total):
        # The last partial sample (kept only without drop_last) ends where Megatron's loop runs out.
        sample_index[-1] = (len(document_index) - 1, int(sizes[document_index[-1]]) - extra)
    sample_index[0] = (0, 0)
    return sample_index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Shuffled [0, num_samples) followed by shuffled [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sizes: np.ndarray,
    documents: np.ndarray,
    *,
    num_samples: int | None,
    seq_len: int,
    seed: int,
    drop_last_partial: bool = True,
    extra: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index, sample_index, shuffle_index) for the sequences `documents` of `sizes`."""
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch=tokens_per_epoch, num_samples=num_samples, seq_len=seq_len, extra=extra)
    separate_final_epoch = False
    if num_epochs > 1:
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_len
        samples_per_epoch = (tokens_per_epoch - extra) // seq_len
        from_final = num_samples - samples_before_final
        assert 0 <= from_final <= samples_per_epoch + 1
        # Megatron shuffles a final epoch apart when less than 80% of it is used, so the few samples
        # taken from it are not biased toward documents that happen to be early in a global shuffle.
        separate_final_epoch = from_final < int(0.80 * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch=separate_final_epoch)
    sample_index = build_sample_index(
        sizes, document_index, seq_len=seq_len, drop_last_partial=drop_last_partial, extra=extra
    )
    total = sample_index.shape[0] - 1
    first = samples_before_final if separate_final_epoch else total
    shuffle_index = build_shuffle_index(first, total, rng)
    return document_index, sample_index, shuffle_index


# ---------------------------------------------------------------- the dataset
@dataclass(kw_only=True, frozen=True)
class GPTSplitConfig:
    """What determines one split's sample order."""

    seq_len: int
    """Tokens per training sample (each read returns seq_len + 1: inputs and the last label)."""
    seed: int = 1234
    """numpy RandomState seed for the document and sample shuffles (Megatron's --seed)."""
    split: str = "99,1,0"
    """train,valid,test shares of the sequences (Megatron's --split)."""
    drop_last_partial: bool = True
    """Drop a final sample shorter than seq_len + 1 (Megatron keeps it only for valid when asked)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise LlamatronError(f"sequence length {self.seq_len} is too small; use at least 2")
        parse_split(self.split)


class GPTDataset:
    """One split of one indexed dataset; `ds[i]` is sample i in Megatron's order, (seq_len + 1,) int64."""

    def __init__(
        self,
        dataset: IndexedDataset,
        *,
        config: GPTSplitConfig,
        which: str = "train",
        num_samples: int | None = None,
        cache_dir: str | Path | None = None,
        pad_id: int = -1,
    ) -> None:
        self.dataset = dataset
        self.config = config
        self.which = which
        self.num_samples = num_samples
        self.pad_id = pad_id
        bounds = split_range(dataset.sequence_count, config.split, which)
        if bounds is None:
            raise LlamatronError(f"split {config.split!r} gives the {which} split no data; give it a non-zero share")
        self.sequence_range = bounds
        if bounds[0] >= bounds[1]:
            raise LlamatronError(
                f"the {which} split of {dataset.prefix} gets no sequences ({dataset.sequence_count} in all, "
                f"split {config.split!r}); give it a larger share or use more data"
            )
        self.document_index, self.sample_index, self.shuffle_index = load_or_build_indices(
            dataset, config=config, which=which, bounds=bounds, num_samples=num_samples, cache_dir=cache_dir
        )

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i: (seq_len + 1,) int64 tokens read across document boundaries."""
        j = int(self.shuffle_index[i])
        (doc_beg, off_beg), (doc_end, off_end) = self.sample_index[j], self.sample_index[j + 1]
        extra = 1
        parts = []
        for pos in range(int(doc_beg), int(doc_end) + 1):
            offset = int(off_beg) if pos == doc_beg else 0
            length = int(off_end) + extra - offset if pos == doc_end else None
            parts.append(self.dataset.get(int(self.document_index[pos]), offset=offset, length=length))
        sample = np.concatenate(parts).astype(np.int64)
        want = self.config.seq_len + extra
        if len(sample) < want:
            sample = np.concatenate([sample, np.full(want - len(sample), self.pad_id, dtype=np.int64)])
        return sample

    @property
    def description(self) -> dict:
        return _description(self.dataset, self.config, self.which, self.sequence_range, self.num_samples)


# ---------------------------------------------------------------- index cache
def _idx_fingerprint(dataset: IndexedDataset) -> str:
    """Hash of the .idx bytes (sequence lengths and layout) plus the .bin size: a changed corpus never
    matches an old cache."""
    digest = hashlib.blake2b(digest_size=16)
    with open(dataset.idx_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    digest.update(str(dataset.bin_path.stat().st_size).encode())
    return digest.hexdigest()


def _description(dataset, config, which, bounds, num_samples) -> dict:
    return {
        "format": CACHE_FORMAT,
        "class": "GPTDataset",
        "dataset_path": dataset.prefix,
        "split_name": which,
        "sequence_range": list(bounds),
        "num_samples": num_samples,
        "seq_len": config.seq_len,
        "seed": config.seed,
        "split": config.split,
        "drop_last_partial": config.drop_last_partial,
    }


def _array_digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def load_or_build_indices(
    dataset: IndexedDataset,
    *,
    config: GPTSplitConfig,
    which: str,
    bounds: tuple[int, int],
    num_samples: int | None,
    cache_dir: str | Path | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the three arrays from `cache_dir` when a verified entry exists, else build (and cache) them."""
    description = _description(dataset, config, which, bounds, num_samples)
    if cache_dir is not None:
        description["idx_fingerprint"] = _idx_fingerprint(dataset)
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
        entry = Path(cache_dir) / f"{key}-gpt-{which}"
        cached = load_cache_entry(entry, description, _ARRAY_NAMES)
        if cached is not None:
            return cached
    arrays = build_gpt_indices(
        np.asarray(dataset.sequence_lengths),
        np.arange(bounds[0], bounds[1], dtype=np.int32),
        num_samples=num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        drop_last_partial=config.drop_last_partial,
    )
    if cache_dir is not None:
        save_cache_entry(entry, description, dict(zip(_ARRAY_NAMES, arrays, strict=True)))
    return arrays


_ARRAY_NAMES = ("document_index", "sample_index", "shuffle_index")


def load_cache_entry(entry: Path, description: dict, names: tuple[str, ...]) -> tuple[np.ndarray, ...] | None:
    """The cached arrays, or None when absent, stale or damaged (then they are rebuilt, never trusted)."""
    meta_path = entry / "description.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("description") != description:
            raise ValueError("settings differ")
        arrays = []
        for name in names:
            array = np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            expected = meta["arrays"][name]
            if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
                raise ValueError(f"{name} shape/dtype differ")
            if _array_digest(array) != expected["digest"]:
                raise ValueError(f"{name} content differs")
            arrays.append(array)
        return tuple(arrays)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:
        log.warning("index cache %s is stale or damaged (%s); rebuilding it", entry, err)
        return None


def save_cache_entry(entry: Path, description: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write into a temporary directory and rename it into place, so readers see all or nothing.
    If another process (rank) renamed a complete entry first, ours is dropped. A cache that cannot be
    written (read-only data directory) only costs a rebuild next time, so it is a warning."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        meta = {"description": description, "arrays": {}}
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            meta["arrays"][name] = {"shape": list(array.shape), "dtype": str(array.dtype), "digest": _array_digest(array)}
        (tmp / "description.json").write_text(json.dumps(meta, indent=2))
        if entry.exists():  # stale or damaged: replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "description.json").is_file():
                raise
    except OSError as err:
        log.warning("could not cache indices in %s (%s); they will be rebuilt next time", entry, err)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- data-parallel batch order
class PretrainingSampler:
    """Micro batches of sample indices for one data-parallel rank, in Megatron's order
    (MegatronPretrainingSampler): consecutive global steps take consecutive samples; each block of
    micro_batch_size * dp_size samples is split into dp_size contiguous micro batches, rank r taking
    the r-th. Resumable: `state_dict()` records the samples consumed by all ranks together."""

    def __init__(
        self,
        total_samples: int,
        *,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        drop_last: bool = True,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise LlamatronError(
                f"micro batch size {micro_batch_size}, data-parallel rank {dp_rank} of {dp_size} is not "
                f"a valid layout; need micro batch >= 1 and 0 <= rank < size"
            )
        if total_samples <= 0:
            raise LlamatronError("the dataset holds no samples; use more data or a shorter sequence length")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.drop_last = drop_last

    @property
    def samples_per_step(self) -> int:
        """Samples one micro batch on every rank consumes together."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro batches left for this rank."""
        left = max(self.total_samples - self.consumed_samples, 0)
        return left // self.samples_per_step if self.drop_last else -(-left // self.samples_per_step)

    def __iter__(self):
        block = self.samples_per_step
        mine = slice(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        while self.consumed_samples < self.total_samples:
            end = min(self.consumed_samples + block, self.total_samples)
            if end - self.consumed_samples < block and self.drop_last:
                return
            indices = list(range(self.consumed_samples, end))
            self.consumed_samples = end
            # A short last block is split the same way; a rank whose share is empty gets nothing.
            batch = indices[mine]
            if batch:
                yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "total_samples": self.total_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("total_samples", self.total_samples) != self.total_samples:
            raise LlamatronError(
                f"the saved data position is for {state['total_samples']} samples but this dataset has "
                f"{self.total_samples}; resume with the same data, sequence length, seed and split"
            )
        self.consumed_samples = int(state["consumed_samples"])


def micro_batches(dataset, sampler: PretrainingSampler):
    """(micro_batch_size, seq_len + 1) int64 arrays of the rank's samples, in training order."""
    for indices in sampler:
        yield np.stack([dataset[i] for i in indices])
