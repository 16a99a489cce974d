from __future__ import annotations

import math

from llamatron.model import build_model
from llamatron.train.batching import BatchPlan
from llamatron.train.optim import LRSchedule, param_groups
from tests.conftest import tiny_config


def test_lr_schedule_matches_megatron_formula():
    s = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(5) == 5e-4
    assert s.lr_at(10) == 1e-3
    # Megatron: min + 0.5 * (1 + cos(pi * (step - warmup) / (decay - warmup))) * (max - min)
    assert math.isclose(s.lr_at(60), 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert s.lr_at(110) == 1e-4 and s.lr_at(500) == 1e-4


def test_no_weight_decay_on_norms():
    model = build_model(tiny_config(), seed=0)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * model.config.num_layers + 1


def test_batch_plan_covers_the_global_batch_once_in_megatron_order():
    seen = []
    for rank in range(2):
        plan = BatchPlan(global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=2)
        seen.append(plan.rank_indices(16))
    assert seen[0] == [[16, 17], [20, 21]] and seen[1] == [[18, 19], [22, 23]]
