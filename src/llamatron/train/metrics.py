"""Throughput, MFU and memory figures, and where they are written (console, metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamatron.errors import LlamatronError
from llamatron.model.config import LlamaConfig

# Dense bf16 peak of the cards we report MFU against (TFLOP/s); fp8 counts the same peak, so fp8
# MFU reads as "fraction of bf16 peak", the convention of the published references.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0, "H20": 148.0}


def flops_per_token(config: LlamaConfig, *, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * H * d * T (N without the input embedding, whose
    lookup does no multiply; T the sequence length, for attention's score and value matmuls)."""
    n = config.num_params(include_embedding=False) + config.vocab_size * config.hidden_size
    return 6.0 * n + 12.0 * config.num_layers * config.num_heads * config.dim_per_head * seq_len


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


@dataclass(kw_only=True)
class Throughput:
    """Rates over the window since the last report. Where steps end with a CUDA event, a window is timed on
    the device, from the event that ended the last report's step to the one that ends this report's: the
    host runs a step ahead of the GPU, so its clock at a report measures when the host got there (one
    step late, or at the last step nothing at all), not when the GPU did the work."""

    world_size: int
    flops_per_token: float
    peak_tflops: float | None
    _window_start: float = field(default_factory=time.perf_counter)
    _window_start_event: torch.cuda.Event | None = None
    _window_tokens: int = 0

    def add_tokens(self, tokens: int) -> None:
        self._window_tokens += tokens

    def report(self, *, ended: torch.cuda.Event | None = None) -> dict[str, Any]:
        """`ended`: the (completed, timing) event recorded after the last step of the window, if any."""
        now = time.perf_counter()
        if ended is not None and self._window_start_event is not None:
            elapsed = self._window_start_event.elapsed_time(ended) / 1000
        else:  # the first window (start-up included, as the host saw it) or a device without events
            elapsed = now - self._window_start
        elapsed = max(elapsed, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        per_gpu = tokens_per_s / self.world_size
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu, "step_time_s": elapsed}
        out["mfu"] = (per_gpu * self.flops_per_token / (self.peak_tflops * 1e12)) if self.peak_tflops else None
        self._window_start_event = ended
        self._window_start, self._window_tokens = now, 0
        return out


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocator_retries(device: torch.device) -> int | None:
    """How many times, so far, the CUDA caching allocator found no cached block, freed its whole cache and
    tried again: each time a device-wide synchronisation (cudaFree) that idles the GPU while the host catches
    up, a slowdown no peak figure shows. torchtitan and Megatron watch the same counter."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class MetricsWriter:
    """metrics.jsonl (one object per logged iteration) and, when enabled, TensorBoard."""

    def __init__(
        self, run_dir: Path, *, tensorboard_dir: Path | None, wandb_project: str | None = None,
        run_name: str | None = None, config: dict | None = None,
    ) -> None:
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        self._tb = None
        self._wandb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LlamatronError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard "
                    "(or --logging.tensorboard=false)"
                ) from None
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise LlamatronError(
                    "logging.wandb_project needs the wandb package: pip install wandb (or leave the option unset)"
                ) from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(run_dir), config=config,
                                     resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {
            (key if key.startswith("valid") else f"train/{key}"): value
            for key, value in record.items()
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["iteration"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["iteration"])

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
