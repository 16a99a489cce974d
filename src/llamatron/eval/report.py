"""Results as people and tools read them: a rich table per task on the console, and results.json in
lm-eval's shape ({"results": {name: {"acc", "acc_norm", "n", ...}}, "config": {...}})."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llamatron.checkpoint.atomic import atomic_write_bytes
from llamatron.eval.mc import QuestionResult
from llamatron.eval.tasks import TaskSelection


def print_tables(metrics: dict[str, dict], selections: list[TaskSelection], *, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for selection in selections:
        spec = selection.spec
        table = Table(title=spec.name, show_lines=False)
        for column, justify in (("task", "left"), ("n", "right"), ("acc", "right"), ("acc_norm", "right")):
            table.add_column(column, justify=justify)
        names = sorted(n for n in metrics if n.startswith(spec.subject_prefix))
        for name in names:
            m = metrics[name]
            table.add_row(f"  {name}", str(m["n"]), f"{m['acc']:.4f}", f"{m['acc_norm']:.4f}")
        if spec.name in metrics:
            m = metrics[spec.name]
            table.add_row(f"[bold]{spec.name}[/bold]", str(m["n"]), f"[bold]{m['acc']:.4f}[/bold]",
                          f"[bold]{m['acc_norm']:.4f}[/bold]", end_section=True)
        console.print(table)


def results_document(
    metrics: dict[str, dict], *, config: dict[str, Any], samples: list[QuestionResult] | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {"results": metrics, "config": config}
    if samples is not None:
        document["samples"] = [
            {**asdict(r), "pred": r.pred, "acc": r.acc, "acc_norm": r.acc_norm} for r in samples
        ]
    return document


def write_results(path: Path, document: dict[str, Any]) -> None:
    """Written whole or not at all (temporary name, then rename)."""
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
