"""`llamatron check`: the seed's CHECK / CHECK_ONLY, asserting (exit 1 on a mismatch)."""

from __future__ import annotations

from pathlib import Path

import typer

from llamatron.cli.options import DTYPE_HELP, parse_dtype, pick_device


def check_command(
    hf: Path = typer.Option(..., "--hf", help="Reference HF directory (run by transformers)."),
    mcore: Path = typer.Option(..., "--mcore", help="Megatron-Core checkpoint (loaded from its shards)."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP + " auto: the Megatron checkpoint's."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    tolerance: float | None = typer.Option(
        None, "--tolerance", help="Largest relative error allowed at any point (default: fp32 1e-4, bf16 5e-2, "
        "fp16 1e-2)."),
    iteration: str | None = typer.Option(None, "--iteration", help="Iteration to read, or 'release'."),
) -> None:
    """Compare embedding output, every layer, final norm and logits of the two models; exit 1 past the
    tolerance, naming the first diverging point."""
    from llamatron.checkpoint.verify import check_checkpoints
    from llamatron.cli.convert import parse_iteration

    check_checkpoints(hf, mcore, dtype=parse_dtype(dtype), device=pick_device(device), tolerance=tolerance,
                      iteration=parse_iteration(iteration))
    print("llamatron: check passed")


def register(app: typer.Typer) -> None:
    app.command("check")(check_command)
