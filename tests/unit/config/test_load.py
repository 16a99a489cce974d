from __future__ import annotations

import pytest

from llamatron.config.load import apply_overrides, dump_yaml, from_dict, load_config
from llamatron.errors import LlamatronError


def test_recipe_and_overrides_are_typed():
    config = load_config("tiny-debug", ["--optim.lr=3e-4", "--training.seq_len=32", "--data.data_path=a,b",
                                        "--parallel.distributed_optimizer=false", "--training.train_tokens=none"])
    assert config.optim.lr == 3e-4
    assert config.training.seq_len == 32
    assert config.data.data_path == ["a", "b"]
    assert config.parallel.distributed_optimizer is False
    assert config.training.train_tokens is None


def test_every_unknown_key_and_bad_value_is_reported_at_once():
    with pytest.raises(LlamatronError) as err:
        from_dict({"training": {"seq_lenn": 3, "precision": "fp64"}, "bogus": {}}, source="r.yaml")
    message = str(err.value)
    assert "training.seq_lenn" in message and "fp64" in message and "'bogus'" in message


def test_override_errors_name_the_option():
    config = load_config("tiny-debug")
    with pytest.raises(LlamatronError, match="--optim.lrr"):
        apply_overrides(config, ["--optim.lrr=1"])
    with pytest.raises(LlamatronError, match="training.micro_batch_size: expected an integer"):
        apply_overrides(config, ["--training.micro_batch_size=two"])


def test_validation_lists_every_problem():
    config = load_config("tiny-debug", ["--training.global_batch_size=7", "--optim.min_lr=1", "--training.train_tokens=5"])
    with pytest.raises(LlamatronError) as err:
        config.validate()
    message = str(err.value)
    assert "global_batch_size (7)" in message and "min_lr" in message and "exactly one of" in message
    assert "data.data_path is empty" in message


def test_dump_round_trips():
    config = load_config("tiny-debug", ["--data.data_path=x"])
    import yaml

    assert from_dict(yaml.safe_load(dump_yaml(config)), source="dump") == config


def test_bf16_gradient_reduction_needs_bf16_gradients():
    refused = load_config("tiny-debug", ["--data.data_path=x", "--parallel.grad_reduce_in_bf16=true"])  # fp32 recipe
    with pytest.raises(LlamatronError, match="grad_reduce_in_bf16=true needs training.precision bf16 or fp8"):
        refused.validate()
    for precision in ("bf16", "fp8"):
        load_config("tiny-debug", ["--data.data_path=x", "--parallel.grad_reduce_in_bf16=true",
                                   f"--training.precision={precision}"]).validate()
