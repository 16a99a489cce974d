"""The pipeline split (parallel/pp.py) in one process: layer counts, stage placement, every layout
problem named, and stages that chained in order compute exactly what the whole model computes (the
same modules run in the same order, so fp32 results are bitwise equal)."""

from __future__ import annotations

import pytest
import torch

from llamatron.config.load import load_config
from llamatron.errors import LlamatronError
from llamatron.model import build_model
from llamatron.parallel.pp import pp_problems, split_model, stage_indices, stage_layer_counts
from llamatron.train.trainer import layout_problems
from tests.conftest import tiny_config


def test_even_and_custom_layer_counts():
    assert stage_layer_counts(32, stages=4) == [8, 8, 8, 8]
    assert stage_layer_counts(32, stages=2, pp_layers=[15, 17]) == [15, 17]
    with pytest.raises(LlamatronError, match="do not split evenly into pp\\*virtual_pipeline = 3"):
        stage_layer_counts(32, stages=3)


def test_interleaved_placement_loops_over_the_ranks():
    # Virtual stage s runs on rank s % pp (the placement ScheduleInterleaved1F1B expects).
    assert stage_indices(0, pp=4, virtual_pipeline=2) == [0, 4]
    assert stage_indices(3, pp=4, virtual_pipeline=2) == [3, 7]
    assert stage_indices(1, pp=2) == [1]


def test_every_pipeline_problem_is_named():
    found = pp_problems(num_layers=4, pp=2, virtual_pipeline=1, pp_layers=[0, 2, 3], microbatches=1)
    assert any("has 3 counts but needs one per virtual stage, pp*virtual_pipeline = 2" in p for p in found), found
    assert any("every stage needs at least one layer" in p for p in found), found
    assert any("sums to 5, but the model has 4 layers" in p for p in found), found
    assert any("1F1B pipeline schedule needs at least pp=2 micro-batches" in p for p in found), found
    assert len(found) == 4

    found = pp_problems(num_layers=4, pp=2, virtual_pipeline=2, pp_layers=None, microbatches=3)
    assert found == [
        "the interleaved pipeline schedule (virtual_pipeline=2) needs a multiple of pp=2 micro-batches per step, but "
        "each pipeline gets 3 (global batch / (micro batch x data-parallel size)); raise training.global_batch_size "
        "or lower training.micro_batch_size"
    ]
    assert "needs parallel.pp > 1" in pp_problems(num_layers=4, pp=1, virtual_pipeline=2, pp_layers=None,
                                                  microbatches=4)[0]
    assert pp_problems(num_layers=4, pp=2, virtual_pipeline=2, pp_layers=[1, 1, 1, 1], microbatches=2) == []
    assert pp_problems(num_layers=4, pp=1, virtual_pipeline=1, pp_layers=None, microbatches=1) == []


def test_layout_problems_lists_pipeline_problems_with_the_others():
    config = load_config("tiny-debug", ["--parallel.pp=2", "--parallel.virtual_pipeline=3", "--parallel.tp=2",
                                        "--parallel.sequence_parallel=true", "--parallel.activation_checkpoint=full",
                                        "--parallel.ac_layers=3", "--training.micro_batch_size=8",
                                        "--data.data_path=unused"])
    found = layout_problems(config, world_size=4)
    assert any("4 layers do not split evenly into pp*virtual_pipeline = 6 stages" in p for p in found), found
    assert any("interleaved pipeline schedule (virtual_pipeline=3) needs a multiple of pp=2" in p for p in found), found
    assert len(found) == 2, found  # the ac_layers check waits for a valid split

    config = load_config("tiny-debug", ["--parallel.pp=2", "--parallel.pp_layers=1,3",
                                        "--parallel.activation_checkpoint=full", "--parallel.ac_layers=2",
                                        "--data.data_path=unused"])
    assert layout_problems(config, world_size=2) == [
        "activation_checkpoint=full checkpoints groups of parallel.ac_layers=2 blocks, but the pipeline stages have "
        "[1, 3] blocks; choose ac_layers dividing every stage's count"
    ]


@pytest.mark.parametrize(("pp", "virtual_pipeline", "pp_layers"), [(2, 1, [1, 3]), (2, 2, None), (4, 1, None)])
@pytest.mark.parametrize("tied", [False, True])
def test_stages_in_order_compute_the_whole_model(pp, virtual_pipeline, pp_layers, tied):
    config = tiny_config(num_layers=4, tie_word_embeddings=tied)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    expected = build_model(config, seed=3)(tokens, document_ids=document_ids)
    splits = [split_model(build_model(config, seed=3), pp_rank=r, pp=pp, virtual_pipeline=virtual_pipeline,
                          pp_layers=pp_layers) for r in range(pp)]
    by_index = {index: stage for split in splits for index, stage in zip(split.indices, split.stages, strict=True)}
    assert sorted(by_index) == list(range(pp * virtual_pipeline))

    hidden = tokens
    for index in sorted(by_index):
        hidden = by_index[index](hidden, document_ids=document_ids)
    assert torch.equal(hidden, expected)

    # Every parameter lives on exactly one rank under its global name; a tied embedding also on the last.
    names = [name for split in splits for name in split.rank_model.state_dict()]
    whole = set(build_model(config, seed=3).state_dict())
    assert set(names) == whole
    assert len(names) == len(whole)
    first, last = splits[0], splits[-1]
    assert first.stages[0].embed_tokens is not None and last.stages[-1].lm_head is not None
    if tied:
        assert last.tied_copy is not None and last.tied_copy is not first.tied_weight
        assert torch.equal(last.tied_copy, first.tied_weight)
    else:
        assert last.tied_copy is None and first.tied_weight is None


def test_rank_model_shares_the_stage_modules():
    config = tiny_config(num_layers=4)
    split = split_model(build_model(config, seed=3), pp_rank=1, pp=2, virtual_pipeline=2)
    assert split.indices == [1, 3] and not split.has_first and split.has_last
    assert list(split.rank_model.layers) == ["1", "3"]
    assert split.rank_model.layers["3"] is split.stages[1].layers["3"]
    assert split.rank_model.lm_head is split.stages[1].lm_head and split.rank_model.embed_tokens is None
    assert split.stages[0].norm is None and split.stages[0].lm_head is None
