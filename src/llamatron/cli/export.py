"""`llamatron export`: a training run's checkpoint as HF or Megatron-Core."""

from __future__ import annotations

from pathlib import Path

import typer

from llamatron.cli.options import parse_dtype


def export_command(
    run: Path = typer.Option(..., "--run", help="A run directory (its latest checkpoint) or one step-N directory."),
    to: str = typer.Option(..., "--to", help="hf or mcore."),
    out: Path = typer.Option(..., "--out", help="Output directory (refused if not empty, unless --force)."),
    tp: int = typer.Option(1, "--tp", help="Megatron-Core tensor parallel shards."),
    pp: int = typer.Option(1, "--pp", help="Megatron-Core pipeline stages."),
    layout: str = typer.Option("pai", "--layout", help="Megatron-Core key layout: pai, mcore or mcore-local."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
) -> None:
    """Write a llamatron training checkpoint as a HF directory or Megatron-Core shards."""
    from llamatron.checkpoint.export import export_to_hf, export_to_mcore
    from llamatron.errors import LlamatronError

    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        raise LlamatronError("--dtype auto is not meaningful for export; choose bf16, fp16 or fp32")
    if to == "hf":
        path = export_to_hf(run, out, dtype=torch_dtype, force=force)
    elif to == "mcore":
        path = export_to_mcore(run, out, tp=tp, pp=pp, layout=layout, dtype=torch_dtype, force=force)
    else:
        raise LlamatronError(f"--to must be hf or mcore, got {to!r}")
    print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
