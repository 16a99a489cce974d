"""Data parallelism with FSDP2: each block is a unit, then the root (embedding, norm, output layer)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from llamatron.model.llama import Llama


def apply_fsdp(
    model: Llama,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    shard: bool = True,
    reshard_after_forward: bool = True,
) -> None:
    """Shard (or, with shard=False, replicate) parameters, gradients and optimizer state over `mesh`.

    `mesh` is the 1-D data-parallel mesh. shard=True is ZeRO-3-like (the seed's distributed optimizer,
    with parameters sharded too); shard=False keeps full copies on every rank, as DDP, by running
    FSDP2 on a 2-D (replicate, shard=1) mesh so both modes share one code path. Master weights stay in
    the parameters' dtype (fp32); compute runs in param_dtype; gradients are reduced in reduce_dtype.
    FSDP averages gradients over the data-parallel ranks; the trainer scales each rank's loss by the
    data-parallel size so the result is the exact global-batch gradient. (A divide factor of 1 would say
    the same more directly, but FSDP then reduces with PREMUL_SUM, which gloo lacks.)
    reshard_after_forward=False keeps every block's gathered compute-dtype parameters from its forward to
    its backward: one all-gather (with its cast to param_dtype) per block and step instead of two, for the
    memory of a whole compute-dtype copy of the blocks."""
    if not shard:
        mesh = _replicate_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and index < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def _replicate_mesh(mesh: DeviceMesh) -> DeviceMesh:
    if mesh.size() == 1:
        return mesh
    # Megatron's DO=false: every rank keeps whole parameters and optimizer state. Unflattening the dp
    # mesh (rather than a new init_device_mesh) keeps it a slice of the job's mesh, which FSDP requires
    # to compose with tensor-parallel DTensors on the same mesh's "tp" axis.
    return mesh._unflatten(0, (mesh.size(), 1), ("dp_replicate", "dp_shard"))
