"""The run directory (config.yaml, metrics.jsonl, checkpoints/, tensorboard/) and the iteration counts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamatron.checkpoint.atomic import atomic_write_bytes
from llamatron.config.job import JobConfig
from llamatron.config.load import dump_yaml
from llamatron.errors import LlamatronError

if TYPE_CHECKING:
    from llamatron.train.data import TrainData


@dataclass(kw_only=True, frozen=True)
class ScheduleInfo:
    train_iters: int
    warmup_iters: int
    decay_iters: int


def resolve_schedule(config: JobConfig, *, data: TrainData | None = None) -> ScheduleInfo:  # noqa: ARG001
    """The seed's formulas: tokens become iterations as tokens // (global_batch * seq_len); SFT's
    decay runs over train - warmup iterations, pretraining's over all of them."""
    t, o = config.training, config.optim
    tokens_per_iter = t.global_batch_size * t.seq_len
    train_iters = t.train_iters if t.train_iters is not None else t.train_tokens // tokens_per_iter
    if t.warmup_iters is not None:
        warmup = t.warmup_iters
    elif t.warmup_tokens is not None:
        warmup = t.warmup_tokens // tokens_per_iter
    else:
        warmup = 0
    if train_iters < 1:
        raise LlamatronError(
            f"training.train_tokens={t.train_tokens} is less than one iteration of {tokens_per_iter} tokens "
            "(global_batch_size * seq_len); raise it"
        )
    if o.decay_iters is not None:
        decay = o.decay_iters
    elif config.data.kind == "sft":
        decay = train_iters - warmup
    else:
        decay = train_iters
    return ScheduleInfo(train_iters=train_iters, warmup_iters=warmup, decay_iters=decay)


class RunDir:
    """What a run writes, and its console output (rank 0 only)."""

    def __init__(self, root: Path, *, rank: int) -> None:
        self.root = root
        self.rank = rank
        self.checkpoints = root / "checkpoints"

    def prepare(self, config: JobConfig) -> None:
        if self.rank == 0:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / "config.yaml", dump_yaml(config).encode())

    def tensorboard_dir(self, config: JobConfig) -> Path | None:
        if not config.logging.tensorboard:
            return None
        # The seed's layout: {OUT}/tensorboard/{NAME}_{time}.
        name = config.logging.run_name or "llamatron"
        parent = Path(config.logging.tensorboard_dir) if config.logging.tensorboard_dir else self.root / "tensorboard"
        return parent / f"{name}_{time.strftime('%Y.%m.%d-%H.%M.%S')}"

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[llamatron] {message}", file=sys.stderr, flush=True)

    def log_step(self, record: dict, *, total: int) -> None:
        if self.rank != 0:
            return
        parts = [
            f"iter {record['iteration']:>6}/{total}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.3e}",
            f"grad_norm {record['grad_norm']:.3f}",
            f"tok/s {record['tokens_per_s']:,.0f}",
            f"tok/s/gpu {record['tokens_per_s_per_gpu']:,.0f}",
        ]
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if record.get("peak_memory_gib") is not None:
            parts.append(f"mem {record['peak_memory_gib']:.1f}GiB")
        if "valid_loss" in record:
            parts.append(f"valid_loss {record['valid_loss']:.4f} valid_ppl {record['valid_ppl']:.2f}")
        parts.append(f"eta {_format_seconds(record['eta_s'])}")
        print(" | ".join(parts), flush=True)

    def truncate_metrics(self, *, after_iteration: int) -> None:
        """Drop records past the checkpoint being resumed, so metrics.jsonl reads as one run."""
        path = self.root / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line)["iteration"] <= after_iteration]
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
