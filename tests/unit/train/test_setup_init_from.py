"""model.init_from a Megatron-Core checkpoint (the seed's PRETRAIN_CHECKPOINT_PATH): the training model
gets exactly the weights the shards hold, and the architecture is read from the shards' args."""

from __future__ import annotations

import torch

from llamatron.checkpoint.convert import hf_to_mcore
from llamatron.checkpoint.hf import save_hf_model
from llamatron.config.job import JobConfig
from llamatron.model import build_model
from llamatron.train.setup import build_model_for_training, resolve_model_config
from tests.conftest import tiny_config


def test_init_from_mcore_tp2_pp2_loads_the_converted_weights(tmp_path):
    reference = build_model(tiny_config(num_layers=4), seed=3)
    save_hf_model(reference, tmp_path / "hf", dtype=torch.float32)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", tp=2, pp=2, dtype=torch.float32)
    job = JobConfig()
    job.model.init_from = str(tmp_path / "mcore")
    job.training.seq_len = 16

    assert resolve_model_config(job) == reference.config
    model, config = build_model_for_training(job, device=torch.device("cpu"))
    assert config == reference.config
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        # fp32 all the way: a copy, so exact equality
        assert torch.equal(tensor, expected[name]), name
