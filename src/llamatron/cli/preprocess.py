"""`llamatron preprocess`: text corpora to Megatron .bin/.idx; `llamatron preprocess merge`: concatenate.

    llamatron preprocess --input a.jsonl b.jsonl.zst --output-prefix out/corpus --append-eod --workers 8
    llamatron preprocess merge --inputs out/a_text_document out/b_text_document --output-prefix out/all

Both spellings take several values after --input / --inputs, as Megatron's tools do. Typer options
take one value each, so the extra values arrive as positional arguments and are appended in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llamatron.errors import LlamatronError


def preprocess_command(
    args: list[str] = typer.Argument(None, metavar="[merge] [MORE_INPUTS...]", show_default=False,
                                     help="'merge' to concatenate datasets; further --input/--inputs values."),
    input_: list[str] = typer.Option(None, "--input", help="Input files: JSONL, JSON array, .gz/.zst JSONL, parquet."),
    inputs: list[str] = typer.Option(None, "--inputs", help="(merge) dataset prefixes to concatenate, in order."),
    output_prefix: str = typer.Option(..., "--output-prefix", help="Output prefix P: writes P_{key}_document.bin/.idx (merge: P.bin/.idx)."),
    json_key: str = typer.Option("text", "--json-key", help="Field (parquet: column) holding the text."),
    tokenizer: str = typer.Option("llama3", "--tokenizer", help="llama3 or a HF tokenizer directory."),
    append_eod: bool = typer.Option(False, "--append-eod", help="Append <|end_of_text|> to every non-empty document."),
    add_bos: bool = typer.Option(False, "--add-bos", help="Prepend <|begin_of_text|> to every document."),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", help="Tokenizer processes (default: all cores)."),
    on_error: str = typer.Option("fail", "--on-error", help="fail: stop at the first bad record; skip: leave it out and report it."),
) -> None:
    """Tokenize JSONL/JSON/parquet into a Megatron indexed dataset (or `merge` datasets)."""
    args = list(args or [])
    if args and args[0] == "merge":
        _merge([*(inputs or []), *(input_ or []), *args[1:]], output_prefix)
        return
    if inputs:
        raise LlamatronError("--inputs belongs to `preprocess merge`; use --input for text files")
    from llamatron.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        inputs=[Path(p) for p in [*(input_ or []), *args]], output_prefix=output_prefix, json_key=json_key,
        tokenizer=tokenizer, append_eod=append_eod, add_bos=add_bos, workers=workers, on_error=on_error,
    )
    stats = _run_with_progress(config, preprocess)
    _print_summary(stats)


def _run_with_progress(config, preprocess):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    plain = all(p.suffix.lower() in (".jsonl", ".json") and p.is_file() for p in config.inputs)
    total = sum(p.stat().st_size for p in config.inputs) if plain else None
    columns = [
        TextColumn("[bold]preprocess"), BarColumn(), TextColumn("{task.fields[rates]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("preprocess", total=total, rates="starting workers")

        def show(stats) -> None:
            r = stats.rates()
            text = (f"{stats.documents:,} docs ({r['docs_per_s']:,.0f}/s), {stats.tokens:,} tokens "
                    f"({r['tokens_per_s']:,.0f}/s), {stats.bytes / 2**20:,.1f} MB ({r['mb_per_s']:.1f} MB/s)")
            progress.update(task, completed=stats.bytes, rates=text)

        return preprocess(config, on_progress=show)


def _print_summary(stats) -> None:
    r = stats.rates()
    print(f"wrote {stats.prefix}.bin/.idx: {stats.documents:,} documents, {stats.tokens:,} tokens in "
          f"{stats.seconds:.1f} s ({r['docs_per_s']:,.0f} docs/s, {r['tokens_per_s']:,.0f} tokens/s, "
          f"{r['mb_per_s']:.1f} MB/s)")
    if stats.skipped:
        print(f"skipped {stats.skipped:,} records; first ones:")
        for example in stats.skipped_examples:
            print(f"  {example}")


def _merge(prefixes: list[str], output_prefix: str) -> None:
    from llamatron.data.preprocess import merge

    documents, tokens = merge(prefixes, output_prefix)
    print(f"wrote {output_prefix}.bin/.idx: {documents:,} documents, {tokens:,} tokens from {len(prefixes)} datasets")


def register(app: typer.Typer) -> None:
    app.command(
        "preprocess",
        context_settings={"allow_interspersed_args": True},
    )(preprocess_command)
