"""llamatron's training checkpoints on disk (torch.distributed.checkpoint), and loading their weights
into the plain single-device model without a training job (for eval, generate and export).

    RUN/checkpoints/step-0000010/.metadata, __R_0.distcp   DCP shards: model, optimizer, rng
    RUN/checkpoints/step-0000010/train_state.json          counters and data position
    RUN/checkpoints/step-0000010/model.json                the architecture (HF config dict) and tokenizer
    RUN/checkpoints/latest                                 the newest complete checkpoint's name
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from llamatron.errors import LlamatronError
from llamatron.model import Llama, LlamaConfig, build_model, from_hf_config

STEP_DIR = re.compile(r"^step-(\d{7,})$")
MODEL_INFO = "model.json"


def step_dir(root: Path, iteration: int) -> Path:
    return root / f"step-{iteration:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by `root/latest`, or None when there is none yet."""
    marker = root / "latest"
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    path = root / name
    if not STEP_DIR.match(name) or not (path / ".metadata").is_file():
        raise LlamatronError(f"{marker} names {name!r}, which is not a complete checkpoint; remove the marker or fix it")
    return path


def is_run_checkpoint(path: Path) -> bool:
    """A run directory (with checkpoints/latest) or one step-N checkpoint directory."""
    return (path / "checkpoints" / "latest").is_file() or (path / ".metadata").is_file() and STEP_DIR.match(path.name)


def resolve_checkpoint(path: Path) -> Path:
    """A step directory from a run directory (its latest) or a step directory itself."""
    if (path / ".metadata").is_file():
        return path
    found = latest_checkpoint(path / "checkpoints")
    if found is None:
        raise LlamatronError(f"{path}: no complete checkpoint found (expected checkpoints/latest)")
    return found


def write_model_info(path: Path, *, config: LlamaConfig, tokenizer: str) -> None:
    from llamatron.model import to_hf_config

    info = {"config": to_hf_config(config, torch_dtype="float32"), "tokenizer": tokenizer}
    (path / MODEL_INFO).write_text(json.dumps(info, indent=1))


def read_model_info(path: Path) -> tuple[LlamaConfig, str]:
    file = path / MODEL_INFO
    if not file.is_file():
        raise LlamatronError(f"{path} has no {MODEL_INFO}; it was not written by llamatron train")
    info = json.loads(file.read_text())
    return from_hf_config(info["config"], source=str(file)), info["tokenizer"]


def load_dcp_model(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> tuple[Llama, str]:
    """(the model with the checkpoint's weights, its tokenizer spec), in this one process. DCP reads the
    shards of any data-parallel size into whole tensors."""
    import torch.distributed.checkpoint as dcp

    step = resolve_checkpoint(path)
    config, tokenizer = read_model_info(step)
    model = build_model(config, device=device, seed=None)
    state = {"model": model.state_dict()}
    if config.tie_word_embeddings:
        state["model"].pop("lm_head.weight", None)
    with warnings.catch_warnings():
        # Loading in one process is the point here, not a misconfigured process group.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(step))
    model.load_state_dict(state["model"], strict=not config.tie_word_embeddings)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model, tokenizer
