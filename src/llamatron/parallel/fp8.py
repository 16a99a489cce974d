"""fp8 training through torchao's float8: the blocks' linears multiply in fp8 on Ada/Hopper GPUs.

Applied to the plain model before TP and FSDP (DESIGN.md's order: fp8 -> TP/SP -> CP -> AC -> FSDP).
Each eligible nn.Linear becomes torchao's Float8Linear: the same parameter (name, shape, fp32 master
value, so checkpoints do not change), its three matmuls (output, input gradient, weight gradient) fed
float8 operands with dynamic scales: `tensorwise` one scale per tensor (fastest), `rowwise` one per row
(closer to bf16, slower). Everything else computes in bf16 (FSDP's param dtype).

Kept in bf16, as torchtitan does: the output layer (its logits feed the loss, the most sensitive place
to quantise) and any linear whose per-rank dims are not multiples of 16 (torch._scaled_mm requires it).
With tensorwise scaling and a sharding data-parallel mesh, FSDP2 all-gathers those weights in fp8 (half
the bytes of bf16); their scales are then computed for all weights in one all-reduce after each
optimizer step (`Fp8Training.after_optimizer_step`), not one per weight during the all-gather.

`emulate=True` runs the same casts with plain matmuls on any device: CPU tests of the numerics and of
which modules convert, never a speed-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from llamatron.errors import LlamatronError

FP8_RECIPES = ("tensorwise", "rowwise")
# torch._scaled_mm wants every matmul dimension it contracts or writes to be a multiple of 16.
_FP8_ALIGN = 16
_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm89), Hopper (sm90) and newer


@dataclass(kw_only=True)
class Fp8Training:
    """What apply_fp8 did, for the start-up log and the step after the optimizer's."""

    recipe: str
    converted: list[str]
    """Linears that now multiply in fp8."""
    kept: dict[str, str] = field(default_factory=dict)
    """Linears left in bf16 -> why."""
    fsdp_float8_all_gather: bool = False
    emulate: bool = False

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Refresh the fp8 all-gather's weight scales from the updated weights (one all-reduce)."""
        if self.fsdp_float8_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(model)

    def describe(self) -> str:
        kept = ", ".join(f"{name} ({why})" for name, why in self.kept.items()) or "none"
        return (
            f"fp8 {self.recipe} scaling{' (emulated)' if self.emulate else ''}: {len(self.converted)} linears in fp8, "
            f"kept in bf16: {kept}; fp8 all-gather under FSDP: {'on' if self.fsdp_float8_all_gather else 'off'}"
        )


def fp8_device_problem(device: torch.device, *, emulate: bool) -> str | None:
    """Why `device` cannot train in fp8 (None when it can, or when emulating)."""
    if emulate:
        return None
    hint = "set training.fp8_emulate=true to check the fp8 numerics without one (slow), or use bf16"
    if device.type != "cuda":
        return (
            "training.precision=fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability 8.9+: Ada, "
            f"Hopper or newer); this job runs on {device.type}; {hint}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CAPABILITY:
        major, minor = capability
        return (
            f"training.precision=fp8 needs fp8 tensor cores (compute capability 8.9+: sm89 Ada, sm90 Hopper or "
            f"newer); {torch.cuda.get_device_name(device)} is sm{major}{minor}; {hint}"
        )
    return None


def fp8_eligibility(model: nn.Module, *, tp: int = 1) -> tuple[list[str], dict[str, str]]:
    """(names of the linears to convert, {name: why not} for the others). Under tensor parallelism each
    rank multiplies a 1/tp slice of one of the dims, so that slice must stay aligned too; both dims are
    held to 16 x tp, which is stricter than needed but true of every Llama shape."""
    convert, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.split(".")[-1] == "lm_head":
            kept[name] = "output layer"
        elif module.in_features % (_FP8_ALIGN * tp) or module.out_features % (_FP8_ALIGN * tp):
            kept[name] = f"{module.in_features}x{module.out_features} not a multiple of {_FP8_ALIGN * tp}"
        else:
            convert.append(name)
    return convert, kept


def apply_fp8(
    model: nn.Module,
    *,
    recipe: str = "tensorwise",
    device: torch.device,
    tp: int = 1,
    fsdp_float8_all_gather: bool = False,
    emulate: bool = False,
    pad_inner_dim: bool = False,
) -> Fp8Training:
    """Swap the eligible linears of the plain `model` for torchao Float8Linear, in place.

    fsdp_float8_all_gather: FSDP2 will shard the model over more than one rank; only tensorwise scaling
    supports it (a rowwise scale needs the whole row), so it is off for rowwise.
    pad_inner_dim: pad matmul operands to multiples of 16 inside the cast; needed when a micro-batch's
    token count (the weight gradient's inner dim) is not a multiple of 16."""
    if recipe not in FP8_RECIPES:
        raise LlamatronError(f"training.fp8_recipe={recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    problem = fp8_device_problem(device, emulate=emulate)
    if problem:
        raise LlamatronError(problem)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise LlamatronError(
            "training.precision=fp8 needs torchao's float8 training: install llamatron[fp8] (torchao), "
            "e.g. pip install 'llamatron[fp8]'"
        ) from None
    all_gather = fsdp_float8_all_gather and recipe == "tensorwise"
    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=all_gather)
    else:
        config = Float8LinearConfig.from_recipe_name("rowwise")
    config = dataclasses.replace(config, emulate=emulate, pad_inner_dim=pad_inner_dim)
    convert, kept = fp8_eligibility(model, tp=tp)
    chosen = set(convert)
    convert_to_float8_training(model, module_filter_fn=lambda _module, fqn: fqn in chosen, config=config)
    return Fp8Training(recipe=recipe, converted=convert, kept=kept, fsdp_float8_all_gather=all_gather,
                       emulate=emulate)
