"""`llamatron convert hf-to-mcore | mcore-to-hf | mcore-to-mcore`: checkpoint conversion and resharding."""

from __future__ import annotations

from pathlib import Path

import typer

from llamatron.cli.options import DTYPE_HELP, parse_dtype, pick_device
from llamatron.errors import LlamatronError

LAYOUT_HELP = "Megatron key layout: pai (the seed's), mcore (upstream, TE spec) or mcore-local (no TE)."


def parse_iteration(value: str | None) -> int | str | None:
    """--iteration: a number or 'release'; None lets the tracker file pick."""
    if value is None or value == "release":
        return value
    if not value.isdigit():
        raise LlamatronError(f"--iteration {value!r}: use an iteration number or 'release'")
    return int(value)


def parse_pp_layers(value: str | None) -> list[int] | None:
    """--pp-layers 15,17: layers per pipeline stage."""
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise LlamatronError(f"--pp-layers {value!r}: use comma-separated layer counts per stage, e.g. 15,17") from None


def _limit_threads() -> None:
    # Conversion is memory copies: one thread is as fast, and avoids OpenMP spin-waiting on busy hosts.
    import torch

    torch.set_num_threads(1)


def hf_to_mcore_command(
    hf: Path = typer.Option(..., "--hf", help="HF Llama directory (config.json + safetensors)."),
    out: Path = typer.Option(..., "--out", help="Output Megatron-Core checkpoint directory."),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size (must divide the KV groups)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline parallel size."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    layout: str = typer.Option("pai", "--layout", help=LAYOUT_HELP),
    pp_layers: str | None = typer.Option(None, "--pp-layers", help="Layers per stage, e.g. 15,17 (default even)."),
    pad_vocab_multiple: int = typer.Option(
        1, "--pad-vocab-multiple", help="Pad the vocabulary to a multiple of M*TP (1: the seed's exact size; "
        "128: upstream Megatron's make-vocab-size-divisible-by)."),
    check: bool = typer.Option(False, "--check", help="Afterwards, compare layer by layer with the HF model."),
    device: str = typer.Option("cpu", "--device", help="Device for --check: cpu, cuda, cuda:N or auto."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """HF safetensors -> Megatron-Core TP x PP shards (a `release` checkpoint)."""
    from llamatron.checkpoint.convert import hf_to_mcore

    _limit_threads()
    torch_dtype = parse_dtype(dtype)
    hf_to_mcore(hf, out, tp=tp, pp=pp, dtype=torch_dtype, layout=layout, pp_layers=parse_pp_layers(pp_layers),
                pad_vocab_multiple=pad_vocab_multiple, force=force)
    print(f"llamatron: wrote Megatron-Core checkpoint {out} (TP {tp}, PP {pp}, layout {layout})")
    if check:
        from llamatron.checkpoint.verify import check_checkpoints

        check_checkpoints(hf, out, dtype=torch_dtype, device=pick_device(device))


def mcore_to_hf_command(
    mcore: Path = typer.Option(..., "--mcore", help="Megatron-Core checkpoint directory (any TP x PP)."),
    out: Path = typer.Option(..., "--out", help="Output HF directory."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="HF directory to copy tokenizer files from, or 'llama3' (default: files saved "
        "beside the checkpoint, else llama3 for a 128256 vocabulary)."),
    iteration: str | None = typer.Option(None, "--iteration", help="Iteration to read, or 'release' (default: "
                                                                     "the tracker file's)."),
    check: bool = typer.Option(False, "--check", help="Compare the checkpoint with --hf-reference layer by layer."),
    hf_reference: Path | None = typer.Option(None, "--hf-reference", help="HF directory for --check."),
    device: str = typer.Option("cpu", "--device", help="Device for --check."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Megatron-Core (release or iter_*) -> a complete HF directory."""
    from llamatron.checkpoint.convert import mcore_to_hf

    if check and hf_reference is None:
        raise LlamatronError("--check needs --hf-reference DIR (the HF model to compare against)")
    _limit_threads()
    torch_dtype, step = parse_dtype(dtype), parse_iteration(iteration)
    if check:
        from llamatron.checkpoint.verify import check_checkpoints

        check_checkpoints(hf_reference, mcore, dtype=torch_dtype, device=pick_device(device), iteration=step)
    mcore_to_hf(mcore, out, dtype=torch_dtype, tokenizer=tokenizer, iteration=step, force=force)
    print(f"llamatron: wrote HF checkpoint {out}")


def mcore_to_mcore_command(
    mcore: Path = typer.Option(..., "--mcore", help="Megatron-Core checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Output Megatron-Core checkpoint directory."),
    tp: int = typer.Option(1, "--tp", help="Target tensor parallel size."),
    pp: int = typer.Option(1, "--pp", help="Target pipeline parallel size."),
    layout: str | None = typer.Option(None, "--layout", help=LAYOUT_HELP + " Default: the source's."),
    pp_layers: str | None = typer.Option(None, "--pp-layers", help="Layers per stage, e.g. 15,17."),
    pad_vocab_multiple: int | None = typer.Option(None, "--pad-vocab-multiple", help="Default: the source's."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    iteration: str | None = typer.Option(None, "--iteration", help="Iteration to read, or 'release'."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Reshard a Megatron-Core checkpoint to another TP x PP (Megatron itself needs them equal)."""
    from llamatron.checkpoint.convert import mcore_to_mcore

    _limit_threads()
    mcore_to_mcore(mcore, out, tp=tp, pp=pp, layout=layout, pp_layers=parse_pp_layers(pp_layers),
                   pad_vocab_multiple=pad_vocab_multiple, dtype=parse_dtype(dtype),
                   iteration=parse_iteration(iteration), force=force)
    print(f"llamatron: wrote Megatron-Core checkpoint {out} (TP {tp}, PP {pp})")


def register(app: typer.Typer) -> None:
    convert_app = typer.Typer(help="Convert checkpoints: HF <-> Megatron-Core, and reshard Megatron-Core.",
                              no_args_is_help=True)
    convert_app.command("hf-to-mcore")(hf_to_mcore_command)
    convert_app.command("mcore-to-hf")(mcore_to_hf_command)
    convert_app.command("mcore-to-mcore")(mcore_to_mcore_command)
    app.add_typer(convert_app, name="convert")
