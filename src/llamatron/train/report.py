"""A training run at a glance: curves (PNG) and a markdown summary from what the run directory holds.

Reads RUN_DIR/metrics.jsonl (one record per logged iteration, see train/metrics.py), RUN_DIR/config.yaml
(the resolved config) and evaluation results written into the run directory by
`llamatron eval --output RUN_DIR/eval/NAME.json` (lm-eval's shape, see eval/report.py). Both files are
written whole or not at all.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamatron.checkpoint.atomic import atomic_write_bytes
from llamatron.errors import LlamatronError

PNG_NAME = "report.png"
MARKDOWN_NAME = "report.md"
# How many records at each end are averaged for "first" and "last" loss (single records are noisy).
EDGE_RECORDS = 3


@dataclass(kw_only=True)
class EvalResult:
    name: str
    """The results file's stem (e.g. "before", "after")."""
    path: Path
    groups: dict[str, dict[str, float]]
    """Group-level metrics (cmmlu, ceval-valid, mc): {"acc", "acc_norm", "n"}."""
    subjects: dict[str, dict[str, float]]
    model: str | None


@dataclass(kw_only=True)
class RunData:
    root: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] | None
    evals: list[EvalResult] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(iterations, values) of the records that carry a finite `key`."""
        pairs = [(r["iteration"], float(r[key])) for r in self.records
                 if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                 and math.isfinite(float(r[key]))]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def load_run(root: Path) -> RunData:
    """Everything a report needs from RUN_DIR; a bad directory is one clear error."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise LlamatronError(f"run directory {root} {what}; pass the --output of a `llamatron train` run")
    metrics = root / "metrics.jsonl"
    if not metrics.is_file():
        raise LlamatronError(f"{root} has no metrics.jsonl; pass the --output directory of a `llamatron train` run")
    records = []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise LlamatronError(f"{metrics}:{number}: not valid JSON; the file is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise LlamatronError(f"{metrics}:{number}: a record without an integer 'iteration'")
        records.append(record)
    if not records:
        raise LlamatronError(f"{metrics} is empty: the run logged no iteration yet")
    config = None
    config_path = root / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise LlamatronError(f"{config_path}: not valid YAML ({err})") from None
    return RunData(root=root, records=records, config=config if isinstance(config, dict) else None,
                   evals=find_eval_results(root))


def find_eval_results(root: Path) -> list[EvalResult]:
    """Results files of `llamatron eval --output` under RUN_DIR/eval/ (and RUN_DIR/results*.json)."""
    # In the order they were written (a "before" evaluation is listed before its "after").
    candidates = sorted([*(root / "eval").glob("*.json"), *root.glob("results*.json")],
                        key=lambda p: (p.stat().st_mtime, p.name))
    found = []
    for path in candidates:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not an eval results file; the report lists only what it can read
        results = document.get("results") if isinstance(document, dict) else None
        if not isinstance(results, dict):
            continue
        metrics = {k: v for k, v in results.items() if isinstance(v, dict) and "acc" in v}
        if not metrics:
            continue
        groups = {k: v for k, v in metrics.items() if "_" not in k}
        subjects = {k: v for k, v in metrics.items() if "_" in k}
        config = document.get("config") if isinstance(document.get("config"), dict) else {}
        found.append(EvalResult(name=path.stem, path=path, groups=groups, subjects=subjects,
                                model=config.get("model")))
    return found


# ---- summary --------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summary_numbers(run: RunData) -> dict[str, Any]:
    """The figures the markdown shows; a plain dict so tests can check them."""
    _, losses = run.series("loss")
    _, valid = run.series("valid_loss")
    _, step_times = run.series("step_time_s")
    last = run.records[-1]
    loop_time = sum(step_times)
    tokens = last.get("consumed_tokens")
    # The first window holds start-up (model load, first-step compilation): the median of the others
    # is the steady rate.
    _, rates = run.series("tokens_per_s")
    _, rates_gpu = run.series("tokens_per_s_per_gpu")
    steady = rates[1:] or rates
    steady_gpu = rates_gpu[1:] or rates_gpu
    edge = min(EDGE_RECORDS, max(len(losses) // 2, 1))
    return {
        "iterations": last["iteration"],
        "records": len(run.records),
        "consumed_tokens": tokens,
        "consumed_samples": last.get("consumed_samples"),
        "loop_time_s": loop_time,
        "mean_tokens_per_s": (tokens / loop_time) if tokens and loop_time > 0 else None,
        "median_tokens_per_s": statistics.median(steady) if steady else None,
        "median_tokens_per_s_per_gpu": statistics.median(steady_gpu) if steady_gpu else None,
        "world_size": round(rates[-1] / rates_gpu[-1]) if rates and rates_gpu and rates_gpu[-1] > 0 else None,
        "first_loss": _mean(losses[:edge]),
        "last_loss": _mean(losses[-edge:]),
        "edge_records": edge,
        "final_loss": losses[-1] if losses else None,
        "final_valid_loss": valid[-1] if valid else None,
        "final_grad_norm": last.get("grad_norm"),
        "final_lr": last.get("lr"),
        "skipped_steps": last.get("skipped_steps"),
        "mfu": last.get("mfu"),
        "peak_memory_gib": max((r["peak_memory_gib"] for r in run.records if r.get("peak_memory_gib") is not None),
                               default=None),
    }


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _config_rows(config: dict[str, Any] | None) -> list[tuple[str, str]]:
    if config is None:
        return [("config", "no config.yaml in the run directory")]
    section = lambda name: config.get(name) or {}  # noqa: E731 - a one-line accessor
    m, d, t, o, p = (section(n) for n in ("model", "data", "training", "optim", "parallel"))
    data_paths = d.get("data_path") or []
    rows = [
        ("model", f"{m.get('name') or 'from init_from'}; init_from {m.get('init_from') or 'random init'}"
                  f"{' (finetune)' if m.get('finetune') else ''}; tokenizer {m.get('tokenizer')}"),
        ("data", f"{d.get('kind')} on {', '.join(map(str, data_paths)) or '–'}"
                 + (f"; {d.get('sft_format')}, packing {d.get('packing')}" if d.get("kind") == "sft" else "")
                 + (f"; valid {', '.join(map(str, d['valid_data_path']))}" if d.get("valid_data_path") else
                    f"; split {d.get('split')}")),
        ("batch", f"sequence {t.get('seq_len')}, micro batch {t.get('micro_batch_size')}, "
                  f"global batch {t.get('global_batch_size')}"),
        ("schedule", f"{t.get('train_iters') or str(t.get('train_tokens')) + ' tokens'} iterations, warmup "
                     f"{t.get('warmup_iters') or t.get('warmup_tokens') or 0}; lr {o.get('lr')} → {o.get('min_lr')} "
                     f"({o.get('decay_style')}), weight decay {o.get('weight_decay')}, clip {o.get('clip_grad')}"),
        ("precision", f"{t.get('precision')} on {t.get('device')}"),
        ("parallel", f"tp {p.get('tp')}, pp {p.get('pp')}, cp {p.get('cp')}, sequence parallel "
                     f"{p.get('sequence_parallel')}, distributed optimizer {p.get('distributed_optimizer')}, "
                     f"activation checkpointing {p.get('activation_checkpoint')}, optimizer offload "
                     f"{p.get('optimizer_offload')}"),
    ]
    return rows


def render_markdown(run: RunData, numbers: dict[str, Any], *, png_name: str | None) -> str:
    n = numbers
    lines = [f"# Run report: {run.root.name}", "", f"Run directory: `{run.root}`", ""]
    lines += ["## Configuration", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _config_rows(run.config)]
    lines += ["", "## Time and throughput", "", "| | |", "|---|---|"]
    world = n["world_size"]
    lines += [
        f"| iterations | {n['iterations']} ({n['records']} logged) |",
        f"| tokens consumed | {_fmt(n['consumed_tokens'], ',')} |",
        f"| time in the training loop | {_fmt(n['loop_time_s'], '.1f')} s |",
        f"| tokens/s (whole run) | {_fmt(n['mean_tokens_per_s'], ',.1f')} |",
        f"| tokens/s per process (median after the first record) | {_fmt(n['median_tokens_per_s_per_gpu'], ',.1f')}"
        f"{f' on {world} process(es)' if world else ''} |",
    ]
    if n["mfu"] is not None:
        lines.append(f"| MFU (last record) | {100 * n['mfu']:.1f}% |")
    if n["peak_memory_gib"] is not None:
        lines.append(f"| peak GPU memory | {n['peak_memory_gib']:.1f} GiB |")
    lines += ["", "## Final metrics", "", "| | |", "|---|---|"]
    lines += [
        f"| train loss, mean of the first {n['edge_records']} records | {_fmt(n['first_loss'])} |",
        f"| train loss, mean of the last {n['edge_records']} records | {_fmt(n['last_loss'])} |",
        f"| train loss, last record | {_fmt(n['final_loss'])} |",
        f"| validation loss, last | {_fmt(n['final_valid_loss'])} |",
        f"| gradient norm, last | {_fmt(n['final_grad_norm'], '.3f')} |",
        f"| learning rate, last | {_fmt(n['final_lr'], '.3e')} |",
        f"| skipped steps | {_fmt(n['skipped_steps'], 'd')} |",
    ]
    lines += ["", "## Evaluation", ""]
    if not run.evals:
        lines += ["No evaluation results in the run directory (write them with "
                  "`llamatron eval ... --output RUN_DIR/eval/NAME.json`)."]
    else:
        groups = sorted({g for e in run.evals for g in e.groups})
        lines += ["| results | model | " + " | ".join(f"{g} acc (n)" for g in groups) + " |",
                  "|---|---|" + "---|" * len(groups)]
        for e in run.evals:
            cells = [f"{e.groups[g]['acc']:.4f} ({e.groups[g].get('n', '?')})" if g in e.groups else "–"
                     for g in groups]
            lines.append(f"| {e.name} | {e.model or '–'} | " + " | ".join(cells) + " |")
    if png_name:
        lines += ["", "## Curves", "", f"![loss, learning rate, gradient norm and throughput]({png_name})"]
    return "\n".join(lines) + "\n"


# ---- curves ---------------------------------------------------------------------------------------


def render_png(run: RunData) -> bytes:
    """Four panels: train and validation loss, learning rate, gradient norm, tokens/s."""
    try:
        import matplotlib
    except ImportError:
        raise LlamatronError("llamatron report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display; the figure goes to bytes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    fig.suptitle(f"llamatron run {run.root.name}")
    ax = axes[0][0]
    x, y = run.series("loss")
    ax.plot(x, y, label="train", color="tab:blue", marker="." if len(x) < 50 else None)
    vx, vy = run.series("valid_loss")
    if vx:
        ax.plot(vx, vy, label="validation", color="tab:orange", marker="o")
    ax.set_title("loss")
    ax.legend()
    for ax, key, title, color in (
        (axes[0][1], "lr", "learning rate", "tab:green"),
        (axes[1][0], "grad_norm", "gradient norm (before clipping)", "tab:red"),
        (axes[1][1], "tokens_per_s", "tokens/s (all processes)", "tab:purple"),
    ):
        x, y = run.series(key)
        ax.plot(x, y, color=color, marker="." if len(x) < 50 else None)
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


@dataclass(kw_only=True)
class ReportPaths:
    png: Path
    markdown: Path


def write_report(run_dir: Path, *, out: Path | None = None) -> ReportPaths:
    """RUN_DIR/report/{report.png, report.md} (or under `out`); each file appears whole."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.root / "report"
    if out.exists() and not out.is_dir():
        raise LlamatronError(f"--out {out} exists and is not a directory; choose another path")
    png = render_png(run)
    markdown = render_markdown(run, summary_numbers(run), png_name=PNG_NAME)
    paths = ReportPaths(png=out / PNG_NAME, markdown=out / MARKDOWN_NAME)
    atomic_write_bytes(paths.png, png)
    atomic_write_bytes(paths.markdown, markdown.encode("utf-8"))
    return paths
