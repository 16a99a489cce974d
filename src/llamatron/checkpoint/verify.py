"""The seed's CHECK, asserting: a Megatron-Core checkpoint against the HF model it should equal.

The reference is transformers' LlamaForCausalLM on the HF directory; the candidate is llamatron's
model built from the Megatron shards through `load_mcore_model` (the path users rely on). Both run
the same token ids; the embedding output, every layer's output, the final norm and the logits are
compared by max abs error and relative error (max abs error / max |reference|).

Default tolerances on the relative error, per dtype: fp32 1e-4 (two implementations of the same
math agree to ~1e-6; a conversion mistake gives errors near 1), bf16 5e-2 and fp16 1e-2 (rounding
differences between the two implementations, compounded over layers, stay below these; a swapped or
corrupted tensor gives O(1)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llamatron.errors import CheckFailedError, LlamatronError

DEFAULT_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass(kw_only=True, frozen=True)
class PointError:
    """The mismatch at one comparison point."""

    name: str
    """"embedding", "layer {i}", "final norm" or "logits"."""
    max_abs: float
    rel: float
    """max_abs / max |reference|"""


def _unwrap(output: object) -> torch.Tensor:
    # transformers' decoder layers return a tensor in 5.x and a tuple (hidden, ...) before.
    return output[0] if isinstance(output, tuple) else output


def _capture(modules: list[tuple[str, torch.nn.Module]]) -> tuple[dict[str, torch.Tensor], list]:
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules:
        def hook(_module, _inputs, output, name=name):
            captured[name] = _unwrap(output).detach().float().cpu()

        handles.append(module.register_forward_hook(hook))
    return captured, handles


def _hf_points(hf_dir: Path, tokens: torch.Tensor, *, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    inner = model.model
    modules = [("embedding", inner.embed_tokens), *((f"layer {i}", m) for i, m in enumerate(inner.layers)),
               ("final norm", inner.norm)]
    captured, handles = _capture(modules)
    with torch.no_grad():
        captured["logits"] = model(tokens.to(device)).logits.float().cpu()
    for handle in handles:
        handle.remove()
    return captured


def _mcore_points(
    mcore_dir: Path, tokens: torch.Tensor, *, dtype: torch.dtype, device: torch.device, iteration: int | str | None
) -> dict[str, torch.Tensor]:
    from llamatron.checkpoint.mcore import load_mcore_model

    model = load_mcore_model(mcore_dir, device=device, dtype=dtype, iteration=iteration).eval()
    modules = [("embedding", model.embed_tokens), *((f"layer {k}", m) for k, m in model.layers.items()),
               ("final norm", model.norm)]
    captured, handles = _capture(modules)
    with torch.no_grad():
        captured["logits"] = model(tokens.to(device)).float().cpu()
    for handle in handles:
        handle.remove()
    return captured


def compare_checkpoints(
    hf_dir: Path | str, mcore_dir: Path | str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    iteration: int | str | None = None, batch: int = 2, seq_len: int = 48, seed: int = 1234,
) -> list[PointError]:
    """Errors at every comparison point, in model order. dtype None: the Megatron checkpoint's."""
    from llamatron.checkpoint.hf import HFCheckpointReader
    from llamatron.checkpoint.mcore import McoreCheckpointReader

    hf_dir, mcore_dir, device = Path(hf_dir), Path(mcore_dir), torch.device(device)
    hf_config = HFCheckpointReader(hf_dir).config
    reader = McoreCheckpointReader(mcore_dir, iteration=iteration)
    shape = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "dim_per_head",
             "ffn_hidden_size", "tie_word_embeddings")
    differ = [f"{f} {getattr(reader.config, f)} vs {getattr(hf_config, f)}" for f in shape
              if getattr(reader.config, f) != getattr(hf_config, f)]
    if differ:
        raise LlamatronError(f"{mcore_dir} and {hf_dir} are different models ({', '.join(differ)}); "
                             "pass the HF directory the checkpoint was converted from")
    dtype = dtype or reader.dtype
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf_config.vocab_size, (batch, seq_len), generator=generator)
    # One model in memory at a time: the reference's activations are kept, its weights dropped.
    reference = _hf_points(hf_dir, tokens, dtype=dtype, device=device)
    ours = _mcore_points(mcore_dir, tokens, dtype=dtype, device=device, iteration=iteration)
    errors = []
    for name, ref in reference.items():
        diff = (ours[name] - ref).abs().max().item()
        errors.append(PointError(name=name, max_abs=diff, rel=diff / max(ref.abs().max().item(), 1e-30)))
    return errors


def check_checkpoints(
    hf_dir: Path | str, mcore_dir: Path | str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    tolerance: float | None = None, iteration: int | str | None = None, print_table: bool = True,
) -> list[PointError]:
    """compare_checkpoints, print the table, and raise CheckFailedError (exit 1) naming the first
    point past the tolerance."""
    from llamatron.checkpoint.mcore import McoreCheckpointReader

    if dtype is None:
        dtype = McoreCheckpointReader(mcore_dir, iteration=iteration).dtype
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCES[dtype]
    errors = compare_checkpoints(hf_dir, mcore_dir, dtype=dtype, device=device, iteration=iteration)
    if print_table:
        _print_table(errors, limit=limit, dtype=dtype)
    failed = [e for e in errors if not e.rel <= limit]  # NaN fails too
    if failed:
        first = failed[0]
        raise CheckFailedError(
            f"check failed: {mcore_dir} diverges from {hf_dir} first at {first.name} (relative error "
            f"{first.rel:.3g} > tolerance {limit:g} in {str(dtype).removeprefix('torch.')}; "
            f"{len(failed)} of {len(errors)} points past it)"
        )
    return errors


def _print_table(errors: list[PointError], *, limit: float, dtype: torch.dtype) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"HF vs Megatron-Core ({str(dtype).removeprefix('torch.')}, tolerance {limit:g} relative)")
    for column in ("point", "max abs error", "relative error", ""):
        table.add_column(column, justify="right" if "error" in column else "left")
    for e in errors:
        table.add_row(e.name, f"{e.max_abs:.3e}", f"{e.rel:.3e}", "ok" if e.rel <= limit else "FAIL")
    Console().print(table)
