"""Round trips HF -> Megatron-Core -> HF must be bit-identical at every valid TP x PP and layout."""

from __future__ import annotations

import json

import pytest
import torch

from llamatron.checkpoint import convert
from llamatron.checkpoint.hf import HFCheckpointReader, save_hf_model
from llamatron.checkpoint.mcore import load_mcore_model
from llamatron.model import build_model
from tests.conftest import tiny_config

# 8 KV groups so TP 8 is valid; vocab 100 is not a multiple of 8, so TP 8 pads (and must drop) rows.
GRID_CONFIG = {"vocab_size": 100, "hidden_size": 32, "num_heads": 16, "num_kv_heads": 8, "head_dim": 4,
               "ffn_hidden_size": 64, "num_layers": 4}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_source(request, tmp_path_factory):
    config = tiny_config(**GRID_CONFIG, tie_word_embeddings=request.param)
    path = tmp_path_factory.mktemp("hf") / "model"
    save_hf_model(build_model(config, seed=21), path, dtype=torch.float32)
    return path


def assert_same_hf(a, b, *, same_config: bool = True):
    left, right = HFCheckpointReader(a), HFCheckpointReader(b)
    assert sorted(left.names()) == sorted(right.names())
    for name in left.names():
        x, y = left.get(name), right.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    if same_config:
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("layout", ["pai", "mcore", "mcore-local"])
def test_round_trip_every_tp_pp(hf_source, layout, tmp_path):
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4):
            mcore_dir, back = tmp_path / f"m{tp}{pp}", tmp_path / f"hf{tp}{pp}"
            convert.hf_to_mcore(hf_source, mcore_dir, tp=tp, pp=pp, layout=layout)
            convert.mcore_to_hf(mcore_dir, back)
            assert_same_hf(hf_source, back)


def test_reshard_tp2pp2_to_tp4pp1_then_hf(hf_source, tmp_path):
    convert.hf_to_mcore(hf_source, tmp_path / "a", tp=2, pp=2, pad_vocab_multiple=128)
    convert.mcore_to_mcore(tmp_path / "a", tmp_path / "b", tp=4, pp=1)
    assert (tmp_path / "b/release/mp_rank_03/model_optim_rng.pt").is_file()
    convert.mcore_to_hf(tmp_path / "b", tmp_path / "c")
    assert_same_hf(hf_source, tmp_path / "c")


def test_uneven_stages_and_bf16(tmp_path):
    config = tiny_config(num_layers=5)
    save_hf_model(build_model(config, seed=2), tmp_path / "hf", dtype=torch.bfloat16)
    convert.hf_to_mcore(tmp_path / "hf", tmp_path / "m", tp=2, pp=2, pp_layers=[2, 3], layout="mcore-local")
    convert.mcore_to_hf(tmp_path / "m", tmp_path / "back")
    assert_same_hf(tmp_path / "hf", tmp_path / "back")


def test_load_mcore_model_equals_the_source_model(hf_source, tmp_path):
    from llamatron.checkpoint.hf import load_hf_model

    convert.hf_to_mcore(hf_source, tmp_path / "m", tp=4, pp=2, layout="mcore")
    ours, ref = load_mcore_model(tmp_path / "m"), load_hf_model(hf_source)
    for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(ref.state_dict().items()), strict=True):
        assert torch.equal(a, b), name
