"""`llamatron report RUN_DIR`: curves (PNG) and a markdown summary of a training run."""

from __future__ import annotations

from pathlib import Path

import typer


def report_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A `llamatron train` --output directory."),
    out: Path | None = typer.Option(None, "--out", help="Where report.png and report.md go (default RUN_DIR/report)."),
) -> None:
    """Plot train/validation loss, learning rate, gradient norm and tokens/s from RUN_DIR/metrics.jsonl and
    summarise the run (config, time, throughput, final metrics, evaluation results in RUN_DIR/eval/)."""
    from llamatron.train.report import write_report

    paths = write_report(run_dir, out=out)
    print(f"llamatron: wrote {paths.png} and {paths.markdown}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
