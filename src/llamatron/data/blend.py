"""Blending several datasets by weight, and building every split the way Megatron's builder does.

`--data-path 0.3 A 0.7 B` draws samples greedily: at step s the next sample comes from the dataset
whose share lags most behind its target (largest weight * s - count so far, first one on ties), as
megatron-core's helpers.cpp build_blending_indices. Each dataset is asked for
ceil(ceil(size * weight) * 1.005) samples (Megatron's 0.5% surplus) so the greedy order never runs out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamatron.data.gpt_sampler import (
    SPLIT_NAMES,
    GPTDataset,
    GPTSplitConfig,
    load_cache_entry,
    parse_split,
    save_cache_entry,
)
from llamatron.data.indexed import IndexedDataset
from llamatron.errors import LlamatronError

MID_LEVEL_SURPLUS = 0.005
_BLEND_ARRAYS = ("dataset_index", "dataset_sample_index")


@dataclass(kw_only=True, frozen=True)
class Blend:
    """Dataset prefixes and their weights (None: weigh by each dataset's number of samples)."""

    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None = None


def parse_blend(items: Sequence[str]) -> Blend:
    """`["0.3", "A", "0.7", "B"]` or `["A", "B"]` (Megatron's --data-path) as a Blend."""
    items = [str(item).strip() for item in items]
    if not items or any(not item for item in items):
        raise LlamatronError("--data-path is empty; give one or more dataset prefixes, optionally each after a weight")

    def as_float(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    numbers = [as_float(item) for item in items]
    if len(items) % 2 == 0 and all(n is not None for n in numbers[0::2]):
        weights = tuple(float(n) for n in numbers[0::2])
        prefixes = tuple(items[1::2])
        bad = [w for w in weights if not math.isfinite(w) or w <= 0]
        if bad:
            raise LlamatronError(f"blend weight {bad[0]} is not a positive number; use e.g. --data-path 0.3 A 0.7 B")
        if any(as_float(p) is not None for p in prefixes):
            raise LlamatronError(f"blend {' '.join(items)!r} does not parse: expected weight prefix pairs, got two numbers in a row")
        return Blend(prefixes=prefixes, weights=weights)
    if any(n is not None for n in numbers):
        raise LlamatronError(
            f"blend {' '.join(items)!r} does not parse: give either prefixes only (A B) or weight prefix "
            f"pairs (0.3 A 0.7 B), every weight a number"
        )
    return Blend(prefixes=tuple(items), weights=None)


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64), each (size,), in Megatron's greedy order.

    A tight scalar loop: the greedy choice depends on every earlier one, so it does not vectorise
    exactly; about 0.3 us per sample and dataset on one core."""
    return _greedy([float(w) for w in weights], size, limits=None)


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of every dataset exactly once, interleaved greedily in proportion to `sizes`
    (Megatron's order for an unweighted blend of whole datasets)."""
    total = int(sum(sizes))
    return _greedy([int(n) / float(total) for n in sizes], total, limits=[int(n) for n in sizes])


def _greedy(weights: list[float], size: int, *, limits: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    counts = [0] * len(weights)
    open_ids = [i for i in range(len(weights)) if limits is None or limits[i] > 0]
    choices = [0] * size
    positions = [0] * size
    for step in range(size):
        s = float(step) if step > 0 else 1.0
        best = -1
        best_error = -math.inf
        for i in open_ids:
            error = weights[i] * s - counts[i]
            if error > best_error:
                best_error = error
                best = i
        choices[step] = best
        positions[step] = counts[best]
        counts[best] += 1
        if limits is not None and counts[best] == limits[best]:
            open_ids.remove(best)
    return np.array(choices, dtype=np.int16), np.array(positions, dtype=np.int64)


def size_per_dataset(weights: Sequence[float], size: int | None, *, surplus: float = MID_LEVEL_SURPLUS) -> list[int | None]:
    """Samples to request from each dataset for a blend of `size` (None: one epoch each)."""
    if size is None:
        return [None for _ in weights]
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]


class BlendedDataset:
    """Samples drawn from several GPTDatasets in the greedy blending order."""

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        weights: Sequence[float],
        size: int | None,
        *,
        cache_dir: str | Path | None = None,
    ) -> None:
        """`size` None: every sample of every dataset once (`weights` are then the datasets' lengths)."""
        self.datasets = list(datasets)
        self.weights = [int(w) for w in weights] if size is None else normalize(weights)
        description = {
            "class": "BlendedDataset",
            "datasets": [ds.description for ds in self.datasets],
            "weights": self.weights,
            "size": size,
        }
        entry = None
        cached = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
            entry = Path(cache_dir) / f"{key}-blend-{self.datasets[0].which}"
            cached = load_cache_entry(entry, description, _BLEND_ARRAYS)
        if cached is not None:
            self.dataset_index, self.dataset_sample_index = cached
        else:
            if size is None:
                self.dataset_index, self.dataset_sample_index = build_exhaustive_blending_indices(self.weights)
            else:
                self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, size)
            if entry is not None:
                arrays = (self.dataset_index, self.dataset_sample_index)
                save_cache_entry(entry, description, dict(zip(_BLEND_ARRAYS, arrays, strict=True)))
        self.size = len(self.dataset_index)
        used = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for number, (dataset, count) in enumerate(zip(self.datasets, used, strict=True)):
            if count > len(dataset):
                raise LlamatronError(
                    f"the {dataset.which} blend draws {count} samples from dataset {number} "
                    f"({dataset.dataset.prefix}) which holds only {len(dataset)}; this should not happen -- report it"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def build_split_dataset(
    blend: Blend,
    *,
    config: GPTSplitConfig,
    which: str,
    num_samples: int | None,
    cache_dir: str | Path | None = None,
) -> GPTDataset | BlendedDataset:
    """One split (train/valid/test) of a blend, with Megatron's sizes and order.

    `num_samples` is what the trainer needs (e.g. train_iters * global_batch_size); the dataset may
    hold more (whole epochs). As Megatron's BlendedMegatronDatasetBuilder with --data-path and --split."""
    if which not in SPLIT_NAMES:
        raise LlamatronError(f"unknown split {which!r}; use one of {', '.join(SPLIT_NAMES)}")
    if parse_split(config.split)[SPLIT_NAMES.index(which)] is None:
        raise LlamatronError(f"split {config.split!r} gives the {which} split no data; give it a non-zero share")
    indexed = [IndexedDataset(prefix) for prefix in blend.prefixes]
    if len(indexed) == 1 and blend.weights is None:
        return GPTDataset(indexed[0], config=config, which=which, num_samples=num_samples, cache_dir=cache_dir)
    if blend.weights is None:
        parts = [GPTDataset(ds, config=config, which=which, num_samples=None, cache_dir=cache_dir) for ds in indexed]
        lengths = [len(part) for part in parts]
        size = None if num_samples is None else min(num_samples, sum(lengths))
        return BlendedDataset(parts, lengths, size, cache_dir=cache_dir)
    if num_samples is None:
        raise LlamatronError("a weighted blend needs a number of samples; pass --train-samples (or the trainer's)")
    weights = normalize(blend.weights)
    targets = size_per_dataset(weights, num_samples, surplus=0.0)
    requests = size_per_dataset(weights, num_samples)
    parts = [
        GPTDataset(ds, config=config, which=which, num_samples=request, cache_dir=cache_dir)
        for ds, request in zip(indexed, requests, strict=True)
    ]
    return BlendedDataset(parts, weights, sum(targets), cache_dir=cache_dir)


def default_cache_dir(prefix: str) -> Path:
    """Where a dataset's index caches go by default: beside it, as Megatron's `cache/` directory."""
    return Path(prefix).resolve().parent / "cache" / "llamatron_gpt_indices"


def build_blended_dataset(
    paths: Sequence[str],
    *,
    seq_len: int,
    seed: int = 1234,
    split: str = "99,1,0",
    which: str = "train",
    num_samples: int | None,
    cache_dir: str | Path | None = "auto",
) -> GPTDataset | BlendedDataset:
    """Megatron's --data-path list (`["0.3", "A", "0.7", "B"]` or prefixes) to one split's samples.

    `cache_dir="auto"` caches the index arrays beside the first dataset; None disables caching."""
    blend = parse_blend(paths)
    if cache_dir == "auto":
        cache_dir = default_cache_dir(blend.prefixes[0])
    config = GPTSplitConfig(seq_len=seq_len, seed=seed, split=split)
    return build_split_dataset(blend, config=config, which=which, num_samples=num_samples, cache_dir=cache_dir)
