"""The device mesh over (pp, dp, cp, tp) from the parallel degrees and the world size."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llamatron.errors import LlamatronError


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def problems(self) -> list[str]:
        found = []
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tp * self.pp * self.cp
        if model_parallel >= 1 and self.world_size % model_parallel:
            found.append(
                f"world size {self.world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}; "
                "change the process count or the degrees"
            )
        return found


def build_mesh(dims: ParallelDims, *, device_type: str) -> DeviceMesh:
    """A mesh with named axes ("pp", "dp", "cp", "tp"), tp innermost so it stays within a node."""
    if dims.problems():
        raise LlamatronError("; ".join(dims.problems()))
    mesh = init_device_mesh(
        device_type, (dims.pp, dims.dp, dims.cp, dims.tp), mesh_dim_names=("pp", "dp", "cp", "tp")
    )
    if dims.dp > 1 and dims.tp > 1:
        # FSDP x TP parameters live on the (dp, tp) sub-mesh; with its flattened form registered, DTensor
        # reduces over both axes in one collective (the gradient norm) instead of one per axis.
        mesh["dp", "tp"]._flatten("dp_tp")
    return mesh
