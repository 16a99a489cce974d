"""Optimizer offload (the seed's OPTIMIZER_OFFLOAD): AdamW state, and the update, on the CPU.

Design. The optimizer stays one torch AdamW over the model's own parameters, so DCP checkpoints,
`set_lr`, `zero_grad` and gradient clipping see nothing different. For an offloaded parameter its
state (exp_avg, exp_avg_sq: 8 bytes per element of the local shard, as DTensors when the parameter is
one) lives in host memory. Each step copies the parameter's local shard and its gradient to the host,
runs torch's own AdamW step there on those copies with the host state, and copies the new values back;
parameters kept on the device take the ordinary step. Gradients stay on the device, so clipping and
FSDP's reduce-scatter are untouched. The results equal the on-device optimizer: the same AdamW code
on the same fp32 values (bit-identical where both run the same kernel, e.g. foreach on a CPU device; the
CPU and GPU kernels may differ in the last bit).

What it saves: the optimizer state of the offloaded parameters (2/3 of the per-parameter training
state with FSDP2's fp32 sharded master weights, which stay on the device as the model's parameters).
What it costs: per step, 12 bytes per offloaded element over PCIe (parameter and gradient down, the
parameter up) and the CPU's AdamW time.

Modes:
- "static": every parameter's state is offloaded.
- "auto": parameters, in the optimizer's order, keep their state on the device while it fits in
  AUTO_FREE_FRACTION of the device memory free when the optimizer is built (less the gradients, which
  are not allocated yet); the rest is offloaded. Half the free memory is left for activations, the
  FSDP all-gather buffers and the allocator's fragmentation: a fixed, stated margin, not a measurement.
  On a CPU device there is no device memory to spare, so auto offloads everything, as static (the state
  is in host memory either way; the code path still runs).
- "none": the optimizer is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from llamatron.errors import LlamatronError

OFFLOAD_MODES = ("none", "static", "auto")
AUTO_FREE_FRACTION = 0.5
STATE_BYTES_PER_ELEMENT = 8  # fp32 exp_avg + exp_avg_sq
_ADAMW_ARGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
               "differentiable", "fused")


def offload_optimizer(
    optimizer: torch.optim.AdamW, *, mode: str, device: torch.device
) -> torch.optim.AdamW:
    """The optimizer for parallel.optimizer_offload=`mode`: unchanged for none, else an OffloadedAdamW
    over the same parameter groups. Call it before the first step (the state must still be empty)."""
    if mode not in OFFLOAD_MODES:
        raise LlamatronError(f"parallel.optimizer_offload={mode!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if mode == "none":
        return optimizer
    assert not optimizer.state, "offload_optimizer must wrap a fresh optimizer"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if mode == "static":
        offloaded = [True] * len(params)
    else:
        grad_bytes = sum(_local(p).numel() * _local(p).element_size() for p in params)
        budget = auto_budget(device, grad_bytes=grad_bytes)
        offloaded = choose_offloaded([_local(p).numel() * STATE_BYTES_PER_ELEMENT for p in params],
                                     budget_bytes=budget)
    return OffloadedAdamW(
        [dict(group) for group in optimizer.param_groups],
        offloaded=[p for p, off in zip(params, offloaded, strict=True) if off],
        **{name: optimizer.defaults[name] for name in _ADAMW_ARGS},
    )


def auto_budget(device: torch.device, *, grad_bytes: int) -> int:
    """Bytes of optimizer state that auto keeps on `device` (0 on a CPU device)."""
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return max(0, int(AUTO_FREE_FRACTION * (free - grad_bytes)))


def choose_offloaded(state_bytes: list[int], *, budget_bytes: int) -> list[bool]:
    """Which parameters to offload: keep each one's state (in order) on the device while the running
    total fits in budget_bytes; once one does not fit, it and every later one are offloaded."""
    offloaded, used = [], 0
    for size in state_bytes:
        fits = not (offloaded and offloaded[-1]) and used + size <= budget_bytes
        used += size if fits else 0
        offloaded.append(not fits)
    return offloaded


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # Under no_grad, to_local() is the shard itself, so copies into it update the parameter in place.
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (a host tensor) shaped as `param`'s shard: a DTensor with the same mesh and placements."""
    if isinstance(param, DTensor) and local.dim() > 0:
        # Not DTensor.from_local: it moves a host tensor to the mesh's device. This is how FSDP2's own
        # CPU offload keeps host shards (same spec as the parameter: state has its shape and dtype).
        return DTensor(local, param._spec, requires_grad=False)
    return local


class OffloadedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose `offloaded` parameters keep their state on the CPU and update there."""

    def __init__(self, params: Iterable, *, offloaded: Iterable[torch.Tensor], **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._offloaded = {id(p) for p in offloaded}
        # id(param) -> (host shard, host gradient): reused every step; pinned on CUDA so both copies
        # run at full PCIe speed and the copy back does not block the host.
        self._host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def is_offloaded(self, param: torch.Tensor) -> bool:
        return id(param) in self._offloaded

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise LlamatronError("optimizer offload does not support a step closure")
        groups = self.param_groups
        try:
            self.param_groups = self._subset_groups(groups, offloaded=False)
            if self.param_groups:
                super().step()
            self.param_groups = self._subset_groups(groups, offloaded=True)
            if self.param_groups:
                self._host_step()
        finally:
            self.param_groups = groups
        return None

    def _subset_groups(self, groups: list[dict], *, offloaded: bool) -> list[dict]:
        subsets = []
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None and self.is_offloaded(p) == offloaded]
            if params:
                subsets.append({**group, "params": params})
        return subsets

    def _host_buffers(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(param) not in self._host:
            local = _local(param)
            pin = local.device.type == "cuda"
            self._host[id(param)] = (
                torch.empty(local.shape, dtype=local.dtype, pin_memory=pin),
                torch.empty(local.shape, dtype=local.dtype, pin_memory=pin),
            )
        return self._host[id(param)]

    def _host_step(self) -> None:
        # Host copies of the shards and gradients stand in for the parameters during torch's step.
        originals = [group["params"] for group in self.param_groups]
        copies, devices = [], set()
        for group in self.param_groups:
            hosts = []
            for param in group["params"]:
                host, host_grad = self._host_buffers(param)
                host.copy_(_local(param), non_blocking=True)
                host_grad.copy_(_local(param.grad), non_blocking=True)
                host.grad = host_grad
                devices.add(_local(param).device)
                if param in self.state:
                    self.state[host] = {k: _local(v) for k, v in self.state.pop(param).items()}
                hosts.append(host)
            group["params"] = hosts
            copies.append(hosts)
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the host values must be complete before the CPU reads them
        try:
            super().step()
        finally:
            for group, params, hosts in zip(self.param_groups, originals, copies, strict=True):
                for param, host in zip(params, hosts, strict=True):
                    if host in self.state:
                        self.state[param] = {k: _like(param, v) for k, v in self.state.pop(host).items()}
                    # Stream-ordered before the next step's copy into `host`, so the buffer can be reused.
                    _local(param).copy_(host, non_blocking=True)
                    host.grad = None
                group["params"] = params

    def load_state_dict(self, state_dict: dict) -> None:
        # torch moves loaded state to each parameter's device; put the offloaded part back on the host.
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                if self.is_offloaded(param) and param in self.state:
                    self.state[param] = {
                        k: _like(param, _local(v).to("cpu")) if torch.is_tensor(v) else v
                        for k, v in self.state[param].items()
                    }
