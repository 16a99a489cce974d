"""Megatron-Core files on disk: names, tracker, `args`, safe loading, and refusals of bad input."""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types

import numpy as np
import pytest
import torch

from llamatron.checkpoint import convert, mcore
from llamatron.checkpoint.hf import save_hf_model
from llamatron.errors import LlamatronError
from llamatron.model import build_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny model converted at TP 2 x PP 2 (layout pai), and its HF source."""
    root = tmp_path_factory.mktemp("mcore")
    config = tiny_config(num_layers=4)
    save_hf_model(build_model(config, seed=5), root / "hf", dtype=torch.bfloat16)
    convert.hf_to_mcore(root / "hf", root / "m", tp=2, pp=2)
    return root


def _load_raw(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def test_directory_tracker_and_entries(converted):
    m = converted / "m"
    assert (m / "latest_checkpointed_iteration.txt").read_text() == "release"
    names = sorted(p.name for p in (m / "release").iterdir())
    assert names == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    shard = _load_raw(m / "release/mp_rank_01_001/model_optim_rng.pt")
    assert set(shard) == {"args", "checkpoint_version", "iteration", "model"}
    assert shard["checkpoint_version"] == 3.0 and shard["iteration"] == 0
    args = shard["args"]
    # what Megatron compares at load, and the model shape
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (4, 64, 4)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.ffn_hidden_size, args.num_query_groups, args.group_query_attention, args.kv_channels) == (96, 2, True, 16)
    assert (args.padded_vocab_size, args.vocab_size, args.max_position_embeddings) == (256, 256, 512)
    assert args.rotary_base == 10000.0 and args.norm_epsilon == 1e-5 and args.swiglu
    assert args.untie_embeddings_and_output_weights and args.params_dtype == torch.bfloat16 and args.bf16
    assert shard["model"]["decoder.layers.1.mlp.linear_fc2.weight"].dtype == torch.bfloat16


def test_pp1_directory_names(converted, tmp_path):
    convert.hf_to_mcore(converted / "hf", tmp_path / "m", tp=2, pp=1)
    assert sorted(p.name for p in (tmp_path / "m/release").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    assert mcore.is_mcore_checkpoint(tmp_path / "m") and not mcore.is_mcore_checkpoint(converted / "hf")


def _fake_megatron_enum():
    """An enum pickled by reference to megatron.core.transformer.enums, as Megatron-LM's args hold."""
    module = types.ModuleType("megatron.core.transformer.enums")
    attn_backend = enum.Enum("AttnBackend", {"flash": 1, "auto": 5})
    attn_backend.__module__ = module.__name__
    module.AttnBackend = attn_backend
    return module


def test_megatron_written_iteration_with_optimizer_rng_and_enums(converted, tmp_path, monkeypatch):
    # Re-save the shards as Megatron-LM does after training: iter_0000100, optimizer and rng entries,
    # numpy RNG state, and a Megatron enum inside args.
    root = tmp_path / "trained"
    module = _fake_megatron_enum()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for src in (converted / "m/release").glob("*/model_optim_rng.pt"):
        shard = _load_raw(src)
        shard["args"].attention_backend = module.AttnBackend.auto
        del shard["args"].llamatron_hf_config  # a Megatron-made file: the config comes from Megatron's fields
        shard["iteration"] = 100
        shard["optimizer"] = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}}
        shard["rng_state"] = [{"np_rng_state": np.random.RandomState(0).get_state(), "torch_rng_state": torch.get_rng_state()}]
        dst = root / "iter_0000100" / src.parent.name / src.name
        dst.parent.mkdir(parents=True)
        torch.save(shard, dst)
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    monkeypatch.delitem(sys.modules, module.__name__)  # the reader must not need Megatron installed
    convert.mcore_to_hf(root, tmp_path / "back")
    from tests.unit.checkpoint.test_convert import assert_same_hf

    # Megatron's args carry no bos/eos ids nor the rope scaling's band edges: weights must match exactly,
    # and the shapes in config.json
    assert_same_hf(converted / "hf", tmp_path / "back", same_config=False)
    back = json.loads((tmp_path / "back/config.json").read_text())
    assert (back["num_hidden_layers"], back["num_key_value_heads"], back["vocab_size"]) == (4, 2, 256)
    with pytest.raises(LlamatronError, match="iteration directory iter_0000007 not found"):
        mcore.McoreCheckpointReader(root, iteration=7)


def test_foreign_pickled_objects_are_refused(converted, tmp_path):
    import pathlib

    shard = _load_raw(converted / "m/release/mp_rank_00_000/model_optim_rng.pt")
    shard["payload"] = pathlib.PurePosixPath("/etc/passwd")
    torch.save(shard, tmp_path / "evil.pt")
    with pytest.raises(LlamatronError, match="refusing to unpickle pathlib.PurePosixPath"):
        mcore.load_shard_file(tmp_path / "evil.pt")


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tracker(converted, tmp_path):
    m = _copy_checkpoint(converted / "m", tmp_path / "m")
    (m / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(LlamatronError, match="missing tracker file latest_checkpointed_iteration.txt"):
        mcore.McoreCheckpointReader(m)
    assert mcore.McoreCheckpointReader(m, iteration="release").plan.tp == 2  # --iteration overrides


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_shard(converted, tmp_path, damage):
    m = _copy_checkpoint(converted / "m", tmp_path / "m")
    shard = m / "release/mp_rank_01_001/model_optim_rng.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(LlamatronError, match=r"cannot read shard .*mp_rank_01_001.* \(truncated or corrupt\?\)"):
        convert.mcore_to_hf(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or lock files left behind


def test_unexpected_keys(converted, tmp_path):
    m = _copy_checkpoint(converted / "m", tmp_path / "m")
    path = m / "release/mp_rank_00_000/model_optim_rng.pt"
    shard = _load_raw(path)
    shard["model"]["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(3)
    torch.save(shard, path)
    with pytest.raises(LlamatronError, match="unexpected keys decoder.layers.0.self_attention.linear_qkv.bias"):
        mcore.load_mcore_model(m)


def test_non_llama_args(converted, tmp_path):
    m = _copy_checkpoint(converted / "m", tmp_path / "m")
    for path in (m / "release").glob("*/model_optim_rng.pt"):
        shard = _load_raw(path)
        del shard["args"].llamatron_hf_config
        shard["args"].normalization = "LayerNorm"
        shard["args"].num_experts = 8
        torch.save(shard, path)
    with pytest.raises(LlamatronError, match="not a Llama model \\(normalization 'LayerNorm'; 8 experts"):
        mcore.McoreCheckpointReader(m)


def test_load_uses_weights_only(converted, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    mcore.load_mcore_model(converted / "m")
    assert calls and all(c is True for c in calls)
