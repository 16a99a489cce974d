"""Question files in every supported layout read to the same questions; bad input fails with the file,
line and the fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llamatron.errors import LlamatronError
from llamatron.eval.data import DataIndex, Question, read_questions
from llamatron.eval.tasks import CEVAL_VALID, CMMLU, resolve_tasks

ROWS = [("一加一等于几？", "1", "2", "3", "4", "B"), ("多行\n问题，带逗号", "甲", "乙", "丙", "丁", "D")]
EXPECTED = [("一加一等于几？", ("1", "2", "3", "4"), 1), ("多行\n问题，带逗号", ("甲", "乙", "丙", "丁"), 3)]


def _plain(questions: list[Question]) -> list[tuple]:
    return [(q.question, q.choices, q.answer) for q in questions]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def test_cmmlu_ceval_jsonl_arrow_parquet_layouts_read_alike(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cmmlu = tmp_path / "cmmlu"
    _write_csv(cmmlu / "test" / "agronomy.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
               [[i, *r] for i, r in enumerate(ROWS)])
    ceval = tmp_path / "ceval"
    _write_csv(ceval / "val" / "law_val.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
               [[i, *r, "因为"] for i, r in enumerate(ROWS)])
    jsonl = tmp_path / "mc" / "test" / "mine.jsonl"
    jsonl.parent.mkdir(parents=True)
    jsonl.write_text("".join(json.dumps({"question": r[0], "choices": list(r[1:5]), "answer": r[5]},
                                        ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    table = pa.table({"Question": [r[0] for r in ROWS], **{k: [r[i + 1] for r in ROWS] for i, k in enumerate("ABCD")},
                      "Answer": [r[5] for r in ROWS]})
    arrow = tmp_path / "hf" / "haonan-li___cmmlu" / "agronomy" / "0.0.0" / "abc123" / "cmmlu-test.arrow"
    arrow.parent.mkdir(parents=True)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    parquet = tmp_path / "hub" / "law" / "val-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(table, parquet)

    assert _plain(DataIndex(cmmlu, known_subjects=set(CMMLU.subjects)).load("agronomy", "test", task="cmmlu")) == EXPECTED
    assert _plain(DataIndex(ceval, known_subjects=set(CEVAL_VALID.subjects)).load("law", "val", task="c")) == EXPECTED
    assert _plain(read_questions(jsonl)) == EXPECTED
    hf = DataIndex(tmp_path / "hf", known_subjects=set(CMMLU.subjects))
    assert _plain(hf.load("agronomy", "test", task="cmmlu")) == EXPECTED
    hub = DataIndex(tmp_path / "hub", known_subjects=set(CEVAL_VALID.subjects))
    assert _plain(hub.load("law", "val", task="ceval-valid")) == EXPECTED


def test_malformed_csv_row_names_file_and_line(tmp_path):
    path = tmp_path / "test" / "agronomy.csv"
    path.parent.mkdir()
    path.write_text(",Question,A,B,C,D,Answer\n0,好问题,1,2,3,4,A\n1,坏问题,1,2,3,4,E\n", encoding="utf-8")
    with pytest.raises(LlamatronError, match=r"agronomy\.csv:3: malformed row: answer 'E'"):
        read_questions(path)
    path.write_text(",Question,A,B,C,D,Answer\n0,好问题,1,2,3,4,A\n1,多,一,列,1,2,3,4,A\n", encoding="utf-8")
    with pytest.raises(LlamatronError, match=r"agronomy\.csv:3: malformed row: 9 fields where the header has 7"):
        read_questions(path)
    path.write_text("Question,A,B,C\nq,1,2,3\n", encoding="utf-8")
    with pytest.raises(LlamatronError, match=r"missing column\(s\) d, answer"):
        read_questions(path)


def test_missing_subject_or_split_lists_what_was_found(tmp_path):
    _write_csv(tmp_path / "test" / "agronomy.csv", ["", "Question", "A", "B", "C", "D", "Answer"], [[0, *ROWS[0]]])
    index = DataIndex(tmp_path, known_subjects=set(CMMLU.subjects))
    with pytest.raises(LlamatronError, match="subject 'anatomy'.*subjects with a test split: agronomy"):
        index.load("anatomy", "test", task="cmmlu")
    with pytest.raises(LlamatronError, match="no dev split of subject 'agronomy'.*splits found: test"):
        index.load("agronomy", "dev", task="cmmlu")
    with pytest.raises(LlamatronError, match="does not exist"):
        DataIndex(tmp_path / "nowhere", known_subjects=set())


def test_task_names():
    [cmmlu, ceval] = resolve_tasks("cmmlu_agronomy,cmmlu_anatomy,ceval-valid")
    assert (cmmlu.spec.name, cmmlu.subjects) == ("cmmlu", ("agronomy", "anatomy"))
    assert (ceval.spec.name, ceval.subjects) == ("ceval-valid", None)
    assert len(CMMLU.subjects) == 67 and len(CEVAL_VALID.subjects) == 52
    with pytest.raises(LlamatronError, match="unknown task 'mmlu'"):
        resolve_tasks("mmlu")
    with pytest.raises(LlamatronError, match="unknown cmmlu subject 'agronomyy'"):
        resolve_tasks("cmmlu_agronomyy")
