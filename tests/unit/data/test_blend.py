"""--data-path parsing and the greedy blending order's defining property."""

from __future__ import annotations

import numpy as np
import pytest

from llamatron.data.blend import Blend, build_blending_indices, parse_blend, size_per_dataset
from llamatron.errors import LlamatronError


def test_parse_blend_forms():
    assert parse_blend(["0.3", "a", "0.7", "b"]) == Blend(prefixes=("a", "b"), weights=(0.3, 0.7))
    assert parse_blend(["a", "b"]) == Blend(prefixes=("a", "b"), weights=None)
    assert parse_blend(["a"]) == Blend(prefixes=("a",), weights=None)


@pytest.mark.parametrize(
    "items", [[], ["0.3", "a", "0.7"], ["0.3", "a", "b", "c"], ["-1", "a"], ["0", "a"], ["0.3", "0.7"], ["nan", "a"]]
)
def test_bad_blends_raise(items):
    with pytest.raises(LlamatronError):
        parse_blend(items)


def test_greedy_order_follows_the_largest_lag():
    weights = [0.2, 0.5, 0.3]
    index, sample = build_blending_indices(weights, 1000)
    counts = np.zeros(3)
    for step, (d, s) in enumerate(zip(index, sample, strict=True)):
        errors = np.array(weights) * max(step, 1) - counts
        assert d == int(np.argmax(errors)) and s == counts[d]
        counts[d] += 1
    np.testing.assert_allclose(counts / 1000, weights, atol=1e-3)


def test_size_per_dataset_has_surplus():
    assert size_per_dataset([0.3, 0.7], 1000) == [302, 704]
    assert size_per_dataset([0.3, 0.7], None) == [None, None]
