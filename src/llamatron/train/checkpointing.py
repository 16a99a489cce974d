"""Training checkpoints with torch.distributed.checkpoint (DCP).

Layout under the run directory:
    checkpoints/step-0000010/     DCP shards (.metadata, __R_0.distcp): model, optimizer, rng
    checkpoints/step-0000010/train_state.json   counters and the data position (JSON, never pickled)
    checkpoints/latest            the name of the newest complete checkpoint

A checkpoint is written to `step-N.tmp`, renamed once every rank finished, and only then named in
`latest`; a crash at any point leaves the previous checkpoint and marker intact. Optionally the
writing runs in the background (async_save). DCP reshards on
load, so a checkpoint resumes at any data-parallel size.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llamatron.checkpoint.atomic import atomic_write_bytes
from llamatron.checkpoint.dcp import STEP_DIR, latest_checkpoint, step_dir, write_model_info
from llamatron.model import LlamaConfig

__all__ = ["CheckpointSaver", "TrainState", "latest_checkpoint", "load_checkpoint", "load_model_weights", "step_dir"]


@dataclass(kw_only=True)
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0


def _app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    state["rng"] = {"cpu": torch.get_rng_state()}
    return state


class CheckpointSaver:
    """Saves collectively (every rank calls `save`). With async_save the shards are staged to CPU memory,
    written by a background thread while training goes on, and the checkpoint is renamed into place and
    named in `latest` only once every rank finished writing (at the next save, or `wait()`)."""

    def __init__(
        self, root: Path, *, keep_last: int, model_config: LlamaConfig, tokenizer: str, async_save: bool = False
    ) -> None:
        self.root, self.keep_last = root, keep_last
        self.model_config, self.tokenizer = model_config, tokenizer
        # Background writes coordinate over their own gloo group, never the training group's NCCL stream.
        self._group = dist.new_group(backend="gloo") if async_save else None
        self._pending: tuple[object, Path, Path, TrainState] | None = None

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Path:
        self.wait()
        final = step_dir(self.root, state.iteration)
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        app_state = _app_state(model, optimizer)
        if self._group is None:
            dcp.save(app_state, checkpoint_id=str(tmp))
            self._finalize(tmp, final, state)
        else:
            future = dcp.async_save(app_state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = (future, tmp, final, TrainState(**asdict(state)))
        return final

    def wait(self) -> None:
        """Finish a background save, if one is running."""
        if self._pending is None:
            return
        future, tmp, final, state = self._pending
        self._pending = None
        future.result()
        self._finalize(tmp, final, state)

    def _finalize(self, tmp: Path, final: Path, state: TrainState) -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
            write_model_info(tmp, config=self.model_config, tokenizer=self.tokenizer)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_bytes(self.root / "latest", final.name.encode())
            _prune(self.root, keep_last=self.keep_last, keep=final)
        dist.barrier()


def _prune(root: Path, *, keep_last: int, keep: Path) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> TrainState:
    """Load model (and optimizer, when given) in place; returns the counters saved with them."""
    state = _app_state(model, optimizer)
    if optimizer is None:
        state.pop("optimizer")
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    return read_train_state(path)


def load_model_weights(path: Path, *, model: torch.nn.Module) -> None:
    """Only the weights (for --model.finetune or export), resharded to this model's layout."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions(strict=False))}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def read_train_state(path: Path) -> TrainState:
    raw = json.loads((path / "train_state.json").read_text())
    return TrainState(**raw)
