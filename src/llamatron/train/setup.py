"""The plain model for a training job: its config, a deterministic init, initial weights."""

from __future__ import annotations

from pathlib import Path

import torch

from llamatron.config.job import JobConfig
from llamatron.errors import LlamatronError
from llamatron.model import Llama, LlamaConfig, build_model, preset

# Fields that define the weights' shapes and the numerics; two configs agreeing on these fit one checkpoint.
_ARCH_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "dim_per_head", "ffn_hidden_size",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "norm_eps",
)


def _named_config(name: str) -> LlamaConfig:
    path = Path(name)
    if (path / "config.json").is_file():
        from llamatron.checkpoint.hf import HFCheckpointReader

        return HFCheckpointReader(path).config
    return preset(name)


def _init_source(init_from: str) -> tuple[str, LlamaConfig]:
    path = Path(init_from)
    if (path / "config.json").is_file():
        from llamatron.checkpoint.hf import HFCheckpointReader

        return "hf", HFCheckpointReader(path).config
    from llamatron.checkpoint.mcore import McoreCheckpointReader, is_mcore_checkpoint

    if is_mcore_checkpoint(path):
        return "mcore", McoreCheckpointReader(path).config
    raise LlamatronError(
        f"model.init_from {init_from}: not a HF directory (config.json), a Megatron-Core checkpoint "
        "(latest_checkpointed_iteration.txt) or a llamatron run"
    )


def _check_same_architecture(named: LlamaConfig, found: LlamaConfig, *, name: str, source: str) -> None:
    diffs = [
        f"{field}: {getattr(named, field)} vs {getattr(found, field)}"
        for field in _ARCH_FIELDS
        if getattr(named, field) != getattr(found, field)
    ]
    if diffs:
        raise LlamatronError(
            f"model.name={name} does not match the weights in {source} ({'; '.join(diffs)}); "
            "drop model.name to take the weights' architecture"
        )


def resolve_model_config(config: JobConfig) -> LlamaConfig:
    """The architecture a job trains, read without building anything (for checks before launch)."""
    from llamatron.checkpoint.dcp import is_run_checkpoint, read_model_info, resolve_checkpoint

    init_from = config.model.init_from
    if init_from is None:
        return _named_config(config.model.name or "tiny")
    if is_run_checkpoint(Path(init_from)):
        return read_model_info(resolve_checkpoint(Path(init_from)))[0]
    return _init_source(init_from)[1]


def build_model_for_training(
    config: JobConfig, *, device: torch.device, init_weights: bool = True
) -> tuple[Llama, LlamaConfig]:
    """fp32 master weights on `device`: a seeded random init, or the HF / Megatron-Core weights in
    model.init_from. A llamatron checkpoint in init_from is loaded after sharding, by the trainer."""
    from llamatron.checkpoint.dcp import is_run_checkpoint, read_model_info, resolve_checkpoint

    init_from = config.model.init_from
    own_run = init_from is not None and is_run_checkpoint(Path(init_from))
    external = init_from is not None and not own_run
    if external:
        kind, model_config = _init_source(init_from)
    elif own_run:
        model_config, _ = read_model_info(resolve_checkpoint(Path(init_from)))
    else:
        model_config = _named_config(config.model.name or "tiny")
    if init_from is not None and config.model.name is not None:
        _check_same_architecture(_named_config(config.model.name), model_config, name=config.model.name,
                                 source=init_from)
    if config.training.seq_len > model_config.max_position_embeddings:
        raise LlamatronError(
            f"training.seq_len {config.training.seq_len} exceeds the model's {model_config.max_position_embeddings} "
            "positions; lower it"
        )
    if not external or not init_weights:
        seed = config.training.seed if init_weights else None
        return build_model(model_config, device=device, seed=seed), model_config
    if kind == "hf":
        from llamatron.checkpoint.hf import load_hf_model

        model = load_hf_model(init_from, device=device, dtype=torch.float32)
    else:
        from llamatron.checkpoint.mcore import load_mcore_model

        model = load_mcore_model(init_from, device=device, dtype=torch.float32)
    return model, model_config
