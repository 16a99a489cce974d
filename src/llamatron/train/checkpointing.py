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
from collections.abc import Iterable
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


def _app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, flat_optimizer: bool = True) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # Flattened, every value is keyed by its parameter's name ("state.<name>.exp_avg",
        # "param_groups.<name>.lr"). The nested form keeps one list of names per param group, and DCP
        # saves one rank's copy of it: under a pipeline each stage holds other parameters, so that list
        # would be wrong for every other stage's (and a tied embedding's state could not be found).
        options = StateDictOptions(flatten_optimizer_state_dict=flat_optimizer)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)
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
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
    aliases: dict[str, str] | None = None,
) -> TrainState:
    """Load model (and optimizer, when given) in place; returns the counters saved with them.
    `aliases` name, per parameter, the one it is read from where the checkpoint lacks it: a pipeline's
    last stage keeps its own copy of a tied embedding, which a run without a pipeline saved (with its
    optimizer state) only as the embedding."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # Checkpoints written before the optimizer state was flattened are read in their nested form.
    state = _app_state(model, optimizer, flat_optimizer="optimizer.param_groups.0.params" not in saved)
    if optimizer is None:
        state.pop("optimizer")
    restore = _read_missing_from_aliases(state, saved, aliases or {})
    dcp.load(state, checkpoint_id=str(path))
    restore()
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    return read_train_state(path)


def _read_missing_from_aliases(state: dict, saved: Iterable[str], aliases: dict[str, str]):
    """Rename the entries of `state` (model and flattened optimizer state) that the checkpoint, whose
    keys are `saved`, lacks to their alias, in place, for dcp.load to fill; returns the function that
    puts the names back."""
    moved: list[tuple[dict, str, str]] = []  # (container, the alias's key, the own key)
    for name, source in aliases.items():
        for section, container in state.items():
            if not isinstance(container, dict) or section == "rng":
                continue
            for key in list(container):
                alias = _aliased_key(key, name, source)
                if alias is None or alias in container or f"{section}.{key}" in saved:
                    continue
                container[alias] = container.pop(key)
                moved.append((container, alias, key))

    def restore() -> None:
        for container, alias, key in moved:
            container[key] = container.pop(alias)

    return restore


def _aliased_key(key: str, name: str, source: str) -> str | None:
    """`key` with parameter `name` replaced by `source`: the key itself (model state) or a flattened
    optimizer key ("state.<name>.exp_avg", "param_groups.<name>.lr"). None when `key` is not about `name`."""
    if key == name:
        return source
    for prefix in ("state.", "param_groups."):
        if key.startswith(f"{prefix}{name}."):
            return prefix + source + key[len(prefix) + len(name):]
    return None


def load_model_weights(path: Path, *, model: torch.nn.Module) -> None:
    """Only the weights (for --model.finetune or export), resharded to this model's layout."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions(strict=False))}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def read_train_state(path: Path) -> TrainState:
    raw = json.loads((path / "train_state.json").read_text())
    return TrainState(**raw)
