"""tp_problems: every reason a model cannot be split tp ways, listed at once."""

from __future__ import annotations

import pytest

from llamatron.parallel.tp import sequence_problems, tp_problems
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("changes", "tp", "expected"),
    [
        ({}, 2, []),
        ({}, 4, ["above the model's 2 KV heads", "KV heads (2) is not divisible"]),
        ({"num_heads": 3, "num_kv_heads": 3, "hidden_size": 96, "ffn_hidden_size": 91, "vocab_size": 255}, 2,
         ["attention heads (3)", "KV heads (3)", "ffn hidden size (91)", "vocabulary size (255)"]),
    ],
)
def test_tp_problems_lists_every_problem(changes, tp, expected):
    found = tp_problems(tiny_config(**changes), tp)
    assert len(found) == len(expected), found
    for problem, fragment in zip(found, expected, strict=True):
        assert fragment in problem


def test_sequence_problems_name_each_length_that_tp_does_not_divide():
    found = sequence_problems({"training.seq_len": 30, "data.pad_len": 32}, 4)
    assert len(found) == 1 and found[0].startswith("training.seq_len=30 is not divisible by parallel.tp=4"), found
    assert sequence_problems({"training.seq_len": 32}, 4) == []
