"""Process-group set-up from torchrun's (or Slurm's) environment, or a one-process group."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llamatron.errors import LlamatronError


@dataclass(kw_only=True, frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _env_from_slurm() -> None:
    """Map Slurm's variables onto torch's when launched by srun without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = nodes.split(",")[0].split("[")[0]


def init_distributed(device_name: str) -> DistEnv:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPUs."""
    _env_from_slurm()
    launched = "RANK" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name not in ("auto", "cpu", "cuda"):
        raise LlamatronError(f"training.device must be auto, cpu or cuda, got {device_name!r}")
    if use_cuda:
        if not torch.cuda.is_available():
            raise LlamatronError("training.device=cuda but no GPU is visible; use --training.device=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        device_id = device if use_cuda else None
        if launched:
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            # One process without a launcher: an in-memory store, no port to claim and no environment
            # variables left behind for the processes this one may start later.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def host_threads_for(device: torch.device, *, environ: Mapping[str, str] = os.environ) -> int | None:
    """The intra-op CPU threads a training process should use, or None to leave torch's choice: one where
    the model runs on a GPU and the user set no OMP_NUM_THREADS, as torchrun sets for its workers. The host
    then only collates batches and queues kernels, a few small CPU ops a step; spread over every core's
    thread, each took 4-24 ms (threads waiting for the scheduler) and the host fell behind the GPU: 55-58k
    against 61.9k tokens/s on an H100 (docs/BENCHMARKS.md, round 5). On the CPU the threads do the training."""
    if device.type != "cuda" or "OMP_NUM_THREADS" in environ:
        return None
    return 1


def all_reduce_sum(
    values: list[float], *, device: torch.device, group: dist.ProcessGroup | None = None
) -> list[float]:
    """Sum a few scalars over `group` (default: all ranks) in one collective (float64 keeps token counts
    exact). Per-batch values go over the data-parallel group: model-parallel ranks hold the same batch."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()
