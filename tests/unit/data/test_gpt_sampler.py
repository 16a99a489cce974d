"""GPT sampler: Megatron's recorded train order, the sample index against a scalar reference, the index
cache, and the data-parallel micro batch order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llamatron.data.blend import build_blended_dataset
from llamatron.data.gpt_sampler import (
    GPTDataset,
    GPTSplitConfig,
    PretrainingSampler,
    build_sample_index,
    parse_split,
    split_range,
)
from llamatron.data.indexed import IndexedDataset, write_documents
from llamatron.errors import LlamatronError


def test_train_order_equals_megatron_recording(shared_dir):
    gpt = shared_dir / "testdata" / "megatron_gpt"
    record = json.loads((gpt / "gpt_train_samples.json").read_text())
    expected = np.array(record["train_samples_tokens_plus_last_label"])
    ds = build_blended_dataset(
        [str(gpt / "corpus_text_document")], seq_len=record["sequence_length"], seed=record["seed"],
        split=record["split"], which="train", num_samples=record["num_samples"][0], cache_dir=None,
    )
    assert len(ds) == len(expected) == 235
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(len(ds))]), expected)


def _reference_sample_index(sizes, document_index, seq_len, drop_last, extra):
    """helpers.cpp build_sample_idx written as the plain document-by-document loop."""
    total = int(sum(int(sizes[d]) for d in document_index))
    n = (total - extra) // seq_len if drop_last else math.ceil(np.float32(total - extra) / np.float32(seq_len))
    rows = [(0, 0)]
    pos, offset = 0, 0
    while len(rows) <= n:
        remaining = seq_len + extra
        while remaining:
            length = int(sizes[document_index[pos]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - extra
                remaining = 0
            elif pos == len(document_index) - 1:
                offset = int(sizes[document_index[pos]]) - extra
                break
            else:
                pos, offset = pos + 1, 0
        rows.append((pos, offset))
    return np.array(rows)


@pytest.mark.parametrize("seq_len", [2, 5, 16, 300])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [1, 0])
def test_sample_index_matches_scalar_loop(seq_len, drop_last, extra):
    rng = np.random.default_rng(seq_len)
    sizes = rng.integers(0, 50, 200).astype(np.int32)  # empty sequences included
    sizes[[0, 1, 199]] = 0
    document_index = rng.permutation(np.tile(np.arange(200, dtype=np.int32), 2))
    got = build_sample_index(sizes, document_index, seq_len=seq_len, drop_last_partial=drop_last, extra=extra)
    np.testing.assert_array_equal(got, _reference_sample_index(sizes, document_index, seq_len, drop_last, extra))


def test_split_string_like_megatron():
    assert parse_split("99,1,0") == [(0, 0.99), (0.99, 1.0), None]
    assert parse_split("949,50,1")[2] == pytest.approx((0.999, 1.0))
    assert split_range(200, "99,1,0", "train") == (0, 198) and split_range(200, "99,1,0", "valid") == (198, 200)
    assert split_range(200, "99,1,0", "test") is None
    for bad in ("", "a,b", "0,0,0", "1,1,1,1"):
        with pytest.raises(LlamatronError, match="split"):
            parse_split(bad)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(1)
    write_documents(tmp_path / "c", [rng.integers(0, 500, rng.integers(1, 60)).tolist() for _ in range(80)], dtype=np.int32)
    return IndexedDataset(tmp_path / "c")


def test_cache_is_reused_and_verified(corpus, tmp_path, caplog):
    config = GPTSplitConfig(seq_len=32, seed=9, split="90,10,0")
    cache = tmp_path / "cache"
    first = GPTDataset(corpus, config=config, num_samples=200, cache_dir=cache)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and not any(p.name.startswith(".") for p in cache.iterdir())
    second = GPTDataset(corpus, config=config, num_samples=200, cache_dir=cache)
    assert isinstance(second.shuffle_index, np.memmap)  # loaded, not rebuilt
    np.testing.assert_array_equal(second.shuffle_index, first.shuffle_index)
    # Damage the cached shuffle index: the next build must notice, rebuild and repair it.
    shuffle = np.load(entries[0] / "shuffle_index.npy")
    np.save(entries[0] / "shuffle_index.npy", shuffle[::-1].copy())
    third = GPTDataset(corpus, config=config, num_samples=200, cache_dir=cache)
    assert not isinstance(third.shuffle_index, np.memmap)
    np.testing.assert_array_equal(third.shuffle_index, first.shuffle_index)
    assert "stale or damaged" in caplog.text
    # Other settings get their own entry.
    GPTDataset(corpus, config=GPTSplitConfig(seq_len=32, seed=10, split="90,10,0"), num_samples=200, cache_dir=cache)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_pretraining_sampler_megatron_order_and_resume():
    # Megatron: each global step of mbs*dp samples is cut into dp contiguous micro batches.
    ranks = [list(PretrainingSampler(20, micro_batch_size=2, dp_rank=r, dp_size=3)) for r in range(3)]
    assert ranks[0] == [[0, 1], [6, 7], [12, 13]]
    assert ranks[1] == [[2, 3], [8, 9], [14, 15]]
    assert ranks[2] == [[4, 5], [10, 11], [16, 17]]
    sampler = PretrainingSampler(20, micro_batch_size=2, dp_rank=1, dp_size=3)
    it = iter(sampler)
    assert next(it) == [2, 3]
    state = sampler.state_dict()
    resumed = PretrainingSampler(20, micro_batch_size=2, dp_rank=1, dp_size=3)
    resumed.load_state_dict(state)
    assert list(resumed) == [[8, 9], [14, 15]] == list(it)
    with pytest.raises(LlamatronError, match="rank"):
        PretrainingSampler(20, micro_batch_size=2, dp_rank=3, dp_size=3)
