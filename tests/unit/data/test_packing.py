"""Best-fit decreasing against a direct reference implementation; positions and document ids of rows."""

from __future__ import annotations

import numpy as np
import pytest

from llamatron.data.packing import IGNORE_INDEX, best_fit_decreasing, build_row, positions_and_documents
from llamatron.errors import LlamatronError


def reference_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm, quadratic: longest first, into the fullest bin that still fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if not fits:
            bins.append([i])
            room.append(capacity - lengths[i])
            continue
        best = min(fits, key=lambda b: (room[b], b))
        bins[best].append(i)
        room[best] -= lengths[i]
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_matches_reference(seed):
    rng = np.random.default_rng(seed)
    capacity = 64
    lengths = rng.integers(1, capacity + 1, size=300).tolist()
    bins = best_fit_decreasing(lengths, capacity=capacity)
    assert bins == reference_best_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # A lower bound any packing must meet; BFD stays within 11/9 of optimal + 1.
    assert len(bins) <= 11 / 9 * np.ceil(sum(lengths) / capacity) + 1


def test_best_fit_refuses_overlong_sample():
    with pytest.raises(LlamatronError, match="sample 1 has length 9"):
        best_fit_decreasing([3, 9], capacity=8)


def test_positions_and_documents_restart_per_sample():
    positions, docs = positions_and_documents([3, 2], seq_len=8)
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert docs.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    positions, docs = positions_and_documents([4, 4], seq_len=8)  # full row: no padding document
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert docs.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_build_row_pads_with_pad_id_and_ignore_index():
    a = (np.array([5, 6, 7]), np.array([IGNORE_INDEX, 7, IGNORE_INDEX]))
    b = (np.array([8, 9]), np.array([9, IGNORE_INDEX]))
    row = build_row([a, b], seq_len=7, pad_id=4)
    assert row.tokens.tolist() == [5, 6, 7, 8, 9, 4, 4]
    assert row.labels.tolist() == [IGNORE_INDEX, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    item = row.item()
    assert item["positions"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert item["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2]
