"""`llamatron preprocess-sft`: SFT records (JSON/JSONL) -> the seed's SFT idxmap.

Writes {P}_text_document.bin/.idx as Pai-Megatron-Patch's build_idxmap_sft_dataset names them (train
with that path as the dataset prefix) and {P}_text_document.sft.json with the options and counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def preprocess_sft_command(
    input: Path = typer.Option(..., "--input", help="SFT records: a JSON array or JSONL file."),
    output_prefix: str = typer.Option(..., "--output-prefix", help="Writes {P}_text_document.{bin,idx}."),
    seq_len: int = typer.Option(..., "--seq-len", help="Row length S (each stored document is 2S ids)."),
    packing: bool = typer.Option(False, "--packing/--no-packing", help="Pack several samples per row (best fit)."),
    tokenizer: str = typer.Option("llama3", "--tokenizer", help="llama3 or a HF tokenizer directory."),
    format: str = typer.Option("auto", "--format", help="auto, alpaca, query, messages or sharegpt."),
    on_error: str = typer.Option("raise", "--on-error", help="raise: stop at a bad record; skip: count and leave it out."),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="Train on prompt tokens too."),
    train_turns: str = typer.Option("all", "--train-turns", help="Multi-turn: train all assistant turns or the last."),
    default_system: bool = typer.Option(
        False, "--default-system", help="Add the Llama 3.1 date system block where a record has no system message."
    ),
    truncate: bool = typer.Option(False, "--truncate", help="Cut samples longer than S instead of dropping them."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
) -> None:
    """Tokenize SFT records with the chat format and write the seed's SFT idxmap."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llamatron.checkpoint.atomic import atomic_write_bytes
    from llamatron.data.sft import RawRows, SFTOptions, encode_records, pad_token_id, plan_rows, summary_line
    from llamatron.data.sft_idxmap import IDXMAP_SUFFIX, write_sft_idxmap
    from llamatron.errors import LlamatronError
    from llamatron.tokenizer import load_tokenizer

    prefix = output_prefix + IDXMAP_SUFFIX
    outputs = [Path(prefix + ".bin"), Path(prefix + ".idx")]
    if not force and any(p.exists() for p in outputs):
        raise LlamatronError(f"{prefix}.bin/.idx already exist; choose another --output-prefix or pass --force")
    options = SFTOptions(
        seq_len=seq_len, packing=packing, format=format, on_error=on_error, train_on_prompt=train_on_prompt,
        train_turns=train_turns, default_system=default_system, truncate=truncate,
    )
    tok = load_tokenizer(tokenizer)
    columns = (TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("tokenize", total=None)
        samples = encode_records(
            input, tokenizer=tok, options=options, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if len(samples) == 0:
        raise LlamatronError(f"no sample of {input} is left to write: {summary_line(samples.stats)}")
    rows = RawRows(samples=samples, bins=plan_rows(samples, seq_len=seq_len, packing=packing), seq_len=seq_len,
                   pad_id=pad_token_id(tok))
    count = write_sft_idxmap(prefix, (rows[i] for i in range(len(rows))))
    fill = int(samples.lengths.sum()) / (count * seq_len)
    summary = {"options": options.__dict__, "tokenizer": str(tokenizer), "rows": count, "fill": fill, **samples.stats}
    atomic_write_bytes(Path(prefix + ".sft.json"), (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
    typer.echo(summary_line(samples.stats))
    typer.echo(f"wrote {count} rows of {seq_len} tokens ({'packed' if packing else 'one sample each'}, "
               f"{fill:.1%} non-padding) to {prefix}.bin/.idx; train with dataset prefix {prefix}")


def register(app: typer.Typer) -> None:
    app.command("preprocess-sft")(preprocess_sft_command)
