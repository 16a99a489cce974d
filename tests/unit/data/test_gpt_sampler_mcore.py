"""Sample order against megatron-core 0.16.1 itself: GPTDataset splits and weighted / unweighted blends.

Skipped only when megatron-core is not importable (it is in the dev extra)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from llamatron.data.blend import build_blending_indices, build_split_dataset, parse_blend
from llamatron.data.gpt_sampler import GPTSplitConfig
from llamatron.data.indexed import write_documents

pytest.importorskip("megatron.core.datasets.helpers_cpp")
pytestmark = pytest.mark.filterwarnings("ignore")


def mcore_samples(items, *, seq_len, seed, split, sizes, which):
    """Every sample of megatron-core's split, as the (seq_len + 1) token ids it reads."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    tokenizer = types.SimpleNamespace(vocab_size=128256, eod=128001, pad=128004, unique_identifiers={"t": 1})
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=get_blend_from_list(items), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    )
    ds = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[
        ["train", "valid", "test"].index(which)
    ]
    out = []
    for i in range(len(ds)):
        if isinstance(ds, BlendedDataset):
            part, j = ds.datasets[ds.dataset_index[i]], ds.dataset_sample_index[i]
        else:
            part, j = ds, i
        out.append(part._query_document_sample_shuffle_indices(j)[0])
    return np.array(out)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(0)
    # A: short documents, some empty; B: longer ones, int32.
    write_documents(root / "A", [rng.integers(0, 1000, rng.integers(0, 40)).tolist() for _ in range(300)], dtype=np.uint16)
    write_documents(root / "B", [rng.integers(0, 1000, rng.integers(1, 90)).tolist() for _ in range(100)], dtype=np.int32)
    return root


CASES = [
    # (blend, seq_len, seed, split, sizes [train, valid, test], which)
    (["G"], 128, 1234, "99,1,0", [64, 8, 0], "train"),
    (["G"], 64, 7, "90,5,5", [1000, 8, 8], "train"),  # 3 epochs, the final one shuffled apart
    (["G"], 64, 7, "90,5,5", [1000, 30, 8], "valid"),
    (["G"], 33, 3, "80,20", [700, 30, 8], "train"),  # 2 epochs, final epoch in the global shuffle
    (["A"], 16, 5, "98,2,0", [900, None, None], "train"),
    (["0.3", "A", "0.7", "B"], 16, 11, "98,2,0", [2000, 10, 0], "train"),
    (["A", "B"], 16, 11, "98,2,0", [500, 10, 0], "train"),
    (["A", "B"], 16, 11, "98,2,0", [None, 10, 0], "train"),  # exhaustive blend
    (["2", "A", "1", "G", "1", "B"], 20, 1, "70,20,10", [10, 10, 300], "test"),
]


@pytest.mark.parametrize(("items", "seq_len", "seed", "split", "sizes", "which"), CASES)
def test_samples_equal_megatron_core(shared_dir, corpora, items, seq_len, seed, split, sizes, which):
    gpt = str(shared_dir / "testdata" / "megatron_gpt" / "corpus_text_document")
    paths = [{"G": gpt, "A": str(corpora / "A"), "B": str(corpora / "B")}.get(x, x) for x in items]
    expected = mcore_samples(paths, seq_len=seq_len, seed=seed, split=split, sizes=sizes, which=which)
    ours = build_split_dataset(
        parse_blend(paths), config=GPTSplitConfig(seq_len=seq_len, seed=seed, split=split), which=which,
        num_samples=sizes[["train", "valid", "test"].index(which)],
    )
    assert len(ours) == len(expected)
    np.testing.assert_array_equal(np.stack([ours[i] for i in range(len(ours))]), expected)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.125, 0.125], [0.01, 0.99]])
def test_blending_indices_equal_megatron_core(weights):
    from megatron.core.datasets import helpers

    size = 5000
    want_index = np.zeros(size, dtype=np.int16)
    want_sample = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(want_index, want_sample, np.array(weights), len(weights), size, False)
    got_index, got_sample = build_blending_indices(weights, size)
    np.testing.assert_array_equal(got_index, want_index)
    np.testing.assert_array_equal(got_sample, want_sample)
