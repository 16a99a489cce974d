"""Run multiple-choice tasks on a model: read the questions, build lm-eval's prompts, score them in
batches (each rank of a data-parallel group takes a slice), gather, and aggregate as lm-eval does."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamatron.errors import LlamatronError
from llamatron.eval.data import DataIndex
from llamatron.eval.mc import QuestionResult, build_context, default_add_bos, encode_question
from llamatron.eval.scoring import Row, row_for_pair, score_rows
from llamatron.eval.tasks import TaskSelection, TaskSpec
from llamatron.model import Llama
from llamatron.tokenizer import Tokenizer


@dataclass(kw_only=True)
class EvalConfig:
    shots: int = 0
    """Few-shot examples per question: the first k of the subject's dev split."""
    limit: int | None = None
    """Score only the first N questions of each subject (lm-eval's --limit)."""
    batch_size: int | None = None
    """Rows per forward pass; None sizes batches by a token budget."""
    add_bos: bool | None = None
    """Prepend BOS; None does what the model's HF tokenizer does by default (as lm-eval's HF backend)."""

    def __post_init__(self) -> None:
        problems = []
        if self.shots < 0:
            problems.append(f"--shots must be >= 0, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1 or auto, got {self.batch_size}")
        if problems:
            raise LlamatronError("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One question ready to score."""

    task: str
    subject: str
    index: int
    answer: int
    rows: tuple[Row, ...]
    """One row scoring all four single-token choices, or one row per choice."""


def task_root(data_dir: Path, spec: TaskSpec) -> Path:
    """--data-dir itself, or its subdirectory named after the task (one --data-dir for cmmlu and ceval)."""
    for name in spec.dir_names:
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir


def selected_subjects(selection: TaskSelection, index: DataIndex, *, warn: Callable[[str], None]) -> list[str]:
    spec = selection.spec
    if selection.subjects is not None:
        return list(selection.subjects)
    found = index.subjects(spec.eval_split)
    if spec.subjects:
        found = [s for s in found if s in spec.subjects]
    if not found:
        raise LlamatronError(
            f"{spec.name}: no subject has a {spec.eval_split} split under {index.root} "
            f"(splits found: {', '.join(index.splits()) or 'none'}); expected e.g. "
            f"{spec.eval_split}/<subject>.csv"
        )
    if spec.subjects and len(found) < len(spec.subjects):
        warn(f"{spec.name}: {index.root} holds {len(found)} of its {len(spec.subjects)} subjects; "
             "the group score covers only those")
    return found


def build_prompts(
    selections: list[TaskSelection],
    *,
    data_dir: Path,
    tok: Tokenizer,
    config: EvalConfig,
    max_length: int,
    warn: Callable[[str], None] = lambda msg: print(f"llamatron: warning: {msg}", file=sys.stderr),
) -> list[Prompt]:
    add_bos = default_add_bos(tok) if config.add_bos is None else config.add_bos
    prompts = []
    for selection in selections:
        spec = selection.spec
        known = set(spec.subjects) if spec.subjects else set()
        index = DataIndex(task_root(data_dir, spec), known_subjects=known)
        for subject in selected_subjects(selection, index, warn=warn):
            questions = index.load(subject, spec.eval_split, task=spec.name)[: config.limit]
            shots = index.load(subject, spec.fewshot_split, task=spec.name)[: config.shots] if config.shots else []
            if len(shots) < config.shots:
                raise LlamatronError(
                    f"{spec.name}: --shots {config.shots} but the {spec.fewshot_split} split of {subject} has "
                    f"only {len(shots)} questions; lower --shots"
                )
            description = spec.description(subject)
            for i, question in enumerate(questions):
                context = build_context(description=description, shots=shots, question=question)
                encoded = encode_question(tok, context, add_bos=add_bos)
                if all(len(c) == 1 for c in encoded.choices):
                    rows: tuple[Row, ...] = (Row(tokens=encoded.context[-max_length:], continuations=encoded.choices),)
                else:
                    rows = tuple(row_for_pair(encoded.context, c, max_length=max_length) for c in encoded.choices)
                prompts.append(Prompt(task=spec.name, subject=subject, index=i, answer=question.answer, rows=rows))
    return prompts


def score_prompts(
    model: Llama,
    prompts: list[Prompt],
    *,
    batch_size: int | None,
    on_batch: Callable[[int], None] | None = None,
) -> list[QuestionResult]:
    rows = [row for prompt in prompts for row in prompt.rows]
    scores = iter(score_rows(model, rows, batch_size=batch_size, on_batch=on_batch))
    results = []
    for prompt in prompts:
        lls = tuple(ll for _ in prompt.rows for ll in next(scores).loglikelihoods)
        results.append(QuestionResult(task=prompt.task, subject=prompt.subject, index=prompt.index,
                                      loglikelihoods=lls, answer=prompt.answer))
    return results


def gather_results(local: list[QuestionResult], *, group=None) -> list[QuestionResult]:
    """Every rank's results on every rank, in (task, subject, index) order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        parts: list[list[QuestionResult] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
        local = [r for part in parts for r in (part or [])]
    return sorted(local, key=lambda r: (r.task, r.subject, r.index))


def aggregate(results: list[QuestionResult], selections: list[TaskSelection]) -> dict[str, dict]:
    """lm-eval's numbers: per subject the mean of acc/acc_norm; per group the mean weighted by subject size
    (only for groups asked for whole)."""
    by_name: dict[str, list[QuestionResult]] = {}
    specs = {s.spec.name: s for s in selections}
    for r in results:
        by_name.setdefault(specs[r.task].spec.subject_prefix + r.subject, []).append(r)
    out: dict[str, dict] = {}
    for selection in selections:
        spec = selection.spec
        members = [r for r in results if r.task == spec.name]
        if selection.subjects is None and members:
            out[spec.name] = _metrics(members)
        for name in sorted(n for n in by_name if by_name[n][0].task == spec.name):
            out[name] = _metrics(by_name[name])
    return out


def _metrics(results: list[QuestionResult]) -> dict:
    n = len(results)
    return {
        "acc": sum(r.acc for r in results) / n,
        "acc_norm": sum(r.acc_norm for r in results) / n,
        "n": n,
    }
