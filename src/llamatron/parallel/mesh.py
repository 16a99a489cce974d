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
    if dims.cp > 1:
        # Parameters are replicated over cp: FSDP shards and reduces gradients over dp x cp as one axis.
        mesh["dp", "cp"]._flatten("dp_cp")
    if dims.dp * dims.cp > 1 and dims.tp > 1:
        # FSDP x TP parameters live on the (dp[_cp], tp) sub-mesh; with its flattened form registered,
        # DTensor reduces over both axes in one collective (the gradient norm) instead of one per axis.
        names = ("dp", "cp", "tp") if dims.cp > 1 else ("dp", "tp")
        mesh[names]._flatten("_".join(names))
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh FSDP shards over: "dp", or "dp_cp" under context parallelism (cp ranks hold the
    same parameters and each computes a part of every gradient)."""
    # _flatten returns the mesh build_mesh registered (slicing a flattened name from the root is deprecated).
    return mesh["dp", "cp"]._flatten("dp_cp") if mesh["cp"].size() > 1 else mesh["dp"]
