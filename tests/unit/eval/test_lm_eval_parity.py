"""Same model, same local files: llamatron's CMMLU / C-Eval scoring against lm-evaluation-harness itself
(its HF backend, its own cmmlu / ceval task YAMLs pointed at the files), question by question.

Tolerance: log-likelihoods within 2e-4 absolute (fp32 on CPU; the two run different batch shapes and
attention kernels), identical prompts, identical predictions and accuracies."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml

from llamatron.eval.data import LETTERS, read_questions
from llamatron.eval.runner import EvalConfig, build_prompts, score_prompts
from llamatron.eval.tasks import resolve_tasks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval (the dev extra)"),
]

DEMO = Path(__file__).resolve().parents[3] / "src" / "llamatron" / "assets" / "eval" / "cmmlu_demo"
LL_TOLERANCE = 2e-4


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _task_yaml(out: Path, *, reference: str, template: str, name: str, files: dict[str, Path]) -> None:
    """A copy of lm-eval's own per-subject task reading local CSVs instead of the Hub."""
    tasks = _lm_eval_tasks_dir()
    config = yaml.safe_load((tasks / reference).read_text(encoding="utf-8"))
    config.update(
        task=name, include=str(tasks / template), dataset_path="csv", dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path) for split, path in files.items()}},
    )
    (out / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


def _write_ceval_layout(root: Path, subject: str) -> None:
    """The demo's questions in C-Eval's layout: {dev,val}/{subject}_{split}.csv with its header."""
    for source_split, split in (("dev", "dev"), ("test", "val")):
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            for i, q in enumerate(read_questions(DEMO / source_split / f"{subject}.csv")):
                writer.writerow([i, q.question, *q.choices, LETTERS[q.answer], ""])


def _run_lm_eval(model_dir: Path, *, include: Path, tasks: list[str], shots: int, limit: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=tasks,
        num_fewshot=shots, limit=limit, batch_size=1, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(include)),
    )


def _ours(model, tok, *, data_dir: Path, tasks: str, shots: int, limit: int):
    selections = resolve_tasks(tasks)
    prompts = build_prompts(selections, data_dir=data_dir, tok=tok, config=EvalConfig(shots=shots, limit=limit),
                            max_length=model.config.max_position_embeddings)
    return score_prompts(model, prompts, batch_size=None)


def _compare(reference: dict, ours, *, lm_eval_task: str, subject: str) -> None:
    samples = sorted(reference["samples"][lm_eval_task], key=lambda s: s["doc_id"])
    mine = [r for r in ours if r.subject == subject]
    assert len(samples) == len(mine) > 0
    for sample, result in zip(samples, mine, strict=True):
        lls = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert result.loglikelihoods == pytest.approx(lls, abs=LL_TOLERANCE), sample["doc_id"]
        gaps = sorted(lls, reverse=True)
        if gaps[0] - gaps[1] > 2 * LL_TOLERANCE:  # a near tie may flip either way within tolerance
            assert result.pred == max(range(4), key=lambda i: lls[i])
        assert result.answer == sample["target"]
    acc = reference["results"][lm_eval_task]["acc,none"]
    assert sum(r.acc for r in mine) / len(mine) == pytest.approx(acc, abs=1e-9)


@pytest.fixture(scope="module")
def smollm2():
    from llamatron.checkpoint.bundled import smollm2_hf_dir
    from llamatron.checkpoint.loader import load_model

    path = smollm2_hf_dir()
    model, tok = load_model(path, dtype=None)
    return path, model, tok


@pytest.mark.parametrize("shots,limit", [(0, 2), (5, 1)])
def test_cmmlu_matches_lm_eval(smollm2, tmp_path, monkeypatch, shots, limit):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path, model, tok = smollm2
    subjects = ["elementary_mathematics", "high_school_geography"]
    for subject in subjects:
        _task_yaml(tmp_path, reference=f"cmmlu/cmmlu_{subject}.yaml", template="cmmlu/_default_template_yaml",
                   name=f"ref_cmmlu_{subject}",
                   files={"test": DEMO / "test" / f"{subject}.csv", "dev": DEMO / "dev" / f"{subject}.csv"})
    reference = _run_lm_eval(path, include=tmp_path, tasks=[f"ref_cmmlu_{s}" for s in subjects],
                             shots=shots, limit=limit)
    ours = _ours(model, tok, data_dir=DEMO, tasks=",".join(f"cmmlu_{s}" for s in subjects), shots=shots, limit=limit)
    for subject in subjects:
        _compare(reference, ours, lm_eval_task=f"ref_cmmlu_{subject}", subject=subject)


def test_ceval_matches_lm_eval(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path, model, tok = smollm2
    # A C-Eval subject name with the demo's geography questions: the protocol, not the content, is tested.
    subject, source = "high_school_geography", "high_school_geography"
    data = tmp_path / "ceval"
    _write_ceval_layout(data, source)
    _task_yaml(tmp_path, reference=f"ceval/ceval-valid_{subject}.yaml", template="ceval/_default_ceval_yaml",
               name=f"ref_ceval_{subject}",
               files={"val": data / "val" / f"{subject}_val.csv", "dev": data / "dev" / f"{subject}_dev.csv"})
    reference = _run_lm_eval(path, include=tmp_path, tasks=[f"ref_ceval_{subject}"], shots=2, limit=2)
    ours = _ours(model, tok, data_dir=tmp_path, tasks=f"ceval-valid_{subject}", shots=2, limit=2)
    _compare(reference, ours, lm_eval_task=f"ref_ceval_{subject}", subject=subject)
