"""The protocol pieces: prompts, lm-eval's pair encoding, batched scoring against one-at-a-time full
logits, metrics and the size-weighted group score."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llamatron.eval.data import Question
from llamatron.eval.mc import QuestionResult, build_context, encode_pair
from llamatron.eval.runner import aggregate
from llamatron.eval.scoring import Row, score_rows
from llamatron.eval.tasks import CEVAL_VALID, CMMLU, resolve_tasks
from llamatron.model import build_model
from tests.conftest import tiny_config


def _q(text: str, answer: int) -> Question:
    return Question(question=text, choices=("甲", "乙", "丙", "丁"), answer=answer, source="t")


def test_context_is_description_shots_then_question():
    context = build_context(description="以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n",
                            shots=[_q("  第一题？ ", 2)], question=_q("第二题？\n", 0))
    assert context == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "第一题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： C\n\n"
        "第二题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    )


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")
@pytest.mark.parametrize("spec,pattern", [(CMMLU, "cmmlu/cmmlu_*.yaml"), (CEVAL_VALID, "ceval/ceval-valid_*.yaml")])
def test_subject_descriptions_equal_lm_evals(spec, pattern):
    import lm_eval
    import yaml

    found = {}
    for path in (Path(lm_eval.__file__).parent / "tasks").glob(pattern):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        found[config["dataset_name"]] = config["description"]
    assert found == {subject: spec.description(subject) for subject in spec.subjects}


class _CharTokenizer:
    """One id per character; BOS 1. Enough to see how the pair is split."""

    spec = "chars"
    bos_id = 1

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return ([1] if bos else []) + [ord(c) for c in text]


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding():
    tok = _CharTokenizer()
    context, continuation = encode_pair(tok, "答案： ", "A", add_bos=True)
    assert context == [1, ord("答"), ord("案"), ord("：")]
    assert continuation == [ord(" "), ord("A")]
    context, continuation = encode_pair(tok, "问", " B", add_bos=False)
    assert (context, continuation) == ([ord("问")], [ord(" "), ord("B")])


def test_batched_scoring_equals_one_at_a_time_full_logits():
    torch.manual_seed(0)
    model = build_model(tiny_config(), seed=7).eval()
    rows, pairs = [], []
    for length in (5, 17, 9, 30, 2):
        context = torch.randint(3, 256, (length,)).tolist()
        singles = [[t] for t in torch.randint(3, 256, (4,)).tolist()]
        rows.append(Row(tokens=context, continuations=tuple(singles)))
        pairs.append([(context, c) for c in singles])
        longer = torch.randint(3, 256, (3,)).tolist()
        rows.append(Row(tokens=context + longer[:-1], continuations=(longer,)))
        pairs.append([(context, longer)])
    for batch_size in (None, 1, 3):
        scores = score_rows(model, rows, batch_size=batch_size)
        for score, row_pairs in zip(scores, pairs, strict=True):
            for got, got_greedy, (context, cont) in zip(score.loglikelihoods, score.greedy, row_pairs, strict=True):
                full = torch.tensor([context + cont[:-1]])
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(full)[0].float(), dim=-1)[-len(cont):]
                want = float(logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum())
                assert got == pytest.approx(want, abs=1e-5)
                assert got_greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


def test_metrics_and_group_weighted_by_subject_size():
    def result(subject, index, lls, answer):
        return QuestionResult(task="cmmlu", subject=subject, index=index, loglikelihoods=lls, answer=answer)

    results = [result("agronomy", 0, (-1.0, -2.0, -3.0, -4.0), 0),
               result("anatomy", 0, (-2.0, -1.0, -1.0, -4.0), 1),  # a tie goes to the first (np.argmax)
               result("anatomy", 1, (-2.0, -1.0, -3.0, -4.0), 2),
               result("anatomy", 2, (-2.0, -1.0, -3.0, -4.0), 3)]
    metrics = aggregate(results, resolve_tasks("cmmlu"))
    assert metrics["cmmlu_agronomy"] == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
    assert metrics["cmmlu_anatomy"]["acc"] == pytest.approx(1 / 3)
    assert metrics["cmmlu"]["acc"] == pytest.approx(2 / 4)  # not the unweighted (1 + 1/3) / 2
    assert metrics["cmmlu"]["n"] == 4
    assert "cmmlu" not in aggregate(results, resolve_tasks("cmmlu_agronomy,cmmlu_anatomy"))
