"""Multiple-choice question files: where a subject's split lives under a data directory, and reading it.

Layouts found under a task's data directory (see `DataIndex`):
- CMMLU:   {split}/{subject}.csv            header `,Question,A,B,C,D,Answer`
- C-Eval:  {split}/{subject}_{split}.csv    header `id,question,A,B,C,D,answer,explanation`
- generic: {split}/{subject}.jsonl          objects with question, A..D (or choices: [4]), answer
- HF `datasets` files, as the seed's cmmlu.tgz / ceval.tgz hold them: any `.arrow` (datasets' cache,
  e.g. .../agronomy/.../cmmlu-test.arrow) or `.parquet` (the Hub's, e.g. law/val-00000-of-00001.parquet)
  under a directory named after the subject; the split comes from the file (or its folder) name.
Column names are matched case-insensitively; other columns are ignored. Values are read as the text in
the file (no number parsing), so a choice "1.50" stays "1.50".
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llamatron.errors import LlamatronError

LETTERS = ("A", "B", "C", "D")
# A split name inside a HF data file name: cmmlu-test.arrow, ceval-exam-val.arrow, dev-00000-of-00001.parquet.
_SPLIT_IN_NAME = re.compile(r"(?:^|[-_.])(dev|val|validation|test|train)(?=[-_.])")
_SPLIT_NAMES = ("dev", "val", "validation", "test", "train")
_SPLIT_ALIASES = {"validation": "val"}


@dataclass(frozen=True, kw_only=True)
class Question:
    question: str
    choices: tuple[str, ...]
    """The four option texts, A to D."""
    answer: int
    """Index of the correct choice."""
    source: str
    """file:line (or file#row) it came from, for error messages and logged samples."""


class DataIndex:
    """Every (subject, split) file under one task's data directory, found by one scan."""

    def __init__(self, root: Path, *, known_subjects: set[str]) -> None:
        if not root.is_dir():
            raise LlamatronError(f"data directory {root} does not exist; pass --data-dir pointing at the "
                                 "extracted CMMLU / C-Eval files")
        self.root = root
        self.files: dict[tuple[str, str], list[Path]] = {}
        self._scan_split_dirs(known_subjects)
        self._scan_hf_files(known_subjects)

    def _add(self, subject: str, split: str, path: Path) -> None:
        self.files.setdefault((subject, _SPLIT_ALIASES.get(split, split)), []).append(path)

    def _scan_split_dirs(self, known: set[str]) -> None:
        for split_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            split = split_dir.name
            for path in sorted(split_dir.iterdir()):
                if path.suffix not in (".csv", ".jsonl") or not path.is_file():
                    continue
                subject = path.stem
                # C-Eval names its files {subject}_{split}.csv; strip the suffix unless that is a subject.
                if subject.endswith(f"_{split}") and subject not in known:
                    subject = subject[: -len(split) - 1]
                self._add(subject, split, path)

    def _scan_hf_files(self, known: set[str]) -> None:
        for path in sorted([*self.root.rglob("*.arrow"), *self.root.rglob("*.parquet")]):
            parts = path.relative_to(self.root).parts
            subjects = [p for p in parts[:-1] if p in known]
            match = _SPLIT_IN_NAME.search(path.name)
            # Else a split-named folder (Hub parquet: agronomy/test/0000.parquet); other .arrow files in
            # the datasets cache (cache-*.arrow from map()) match neither and are skipped.
            split = match.group(1) if match else (parts[-2] if len(parts) > 1 else "")
            if subjects and split in _SPLIT_NAMES:
                self._add(subjects[-1], split, path)

    def subjects(self, split: str) -> list[str]:
        return sorted(subject for subject, s in self.files if s == split)

    def splits(self) -> list[str]:
        return sorted({split for _, split in self.files})

    def load(self, subject: str, split: str, *, task: str) -> list[Question]:
        paths = self.files.get((subject, split))
        if not paths:
            found = self.subjects(split)
            if found:
                listing = f"subjects with a {split} split: {', '.join(found)}"
            else:
                listing = f"splits found: {', '.join(self.splits()) or 'none'}"
            raise LlamatronError(
                f"{task}: no {split} split of subject {subject!r} under {self.root} "
                f"(expected e.g. {split}/{subject}.csv); {listing}"
            )
        questions = [q for path in paths for q in read_questions(path)]
        if not questions:
            raise LlamatronError(f"{task}: {', '.join(map(str, paths))} holds no questions")
        return questions


def read_questions(path: Path) -> list[Question]:
    """Questions of one file, in file order (few-shot examples are the first k)."""
    if path.suffix == ".csv":
        rows = _csv_rows(path)
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix in (".arrow", ".parquet"):
        rows = _table_rows(path)
    else:
        raise LlamatronError(f"{path}: unsupported question file type; use .csv, .jsonl, .arrow or .parquet")
    return [_to_question(row, source=source) for source, row in rows]


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        _require_columns(names, source=f"{path}:1")
        start = reader.line_num + 1
        for row in reader:
            source = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(names):
                raise LlamatronError(
                    f"{source}: malformed row: {len(row)} fields where the header has {len(names)} "
                    "(an unquoted comma or newline?); quote the field or fix the row"
                )
            yield source, dict(zip(names, row, strict=True))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise LlamatronError(f"{source}: malformed row: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise LlamatronError(f"{source}: malformed row: expected a JSON object")
            record = {str(k).lower(): v for k, v in record.items()}
            if isinstance(record.get("choices"), list):
                record.update(zip((x.lower() for x in LETTERS), record.pop("choices"), strict=False))
            yield source, record


def _table_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LlamatronError(f"reading {path.name} needs pyarrow; install it with `pip install pyarrow`") from None
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    else:
        # datasets writes its cache as Arrow IPC streams; plain Arrow files are accepted too.
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
    names = [n.lower() for n in table.column_names]
    _require_columns(names, source=str(path))
    for number, row in enumerate(table.to_pylist()):
        yield f"{path}#{number}", {k.lower(): v for k, v in row.items()}


def _require_columns(names: list[str], *, source: str) -> None:
    missing = [c for c in ("question", "a", "b", "c", "d", "answer") if c not in names]
    if missing:
        raise LlamatronError(
            f"{source}: missing column(s) {', '.join(missing)} (found: {', '.join(n for n in names if n) or 'none'}); "
            "question files need question, A, B, C, D, answer"
        )


def _to_question(row: dict, *, source: str) -> Question:
    missing = [c for c in ("question", "a", "b", "c", "d", "answer") if row.get(c) is None]
    if missing:
        raise LlamatronError(f"{source}: malformed row: no value for {', '.join(missing)}")
    answer = row["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(LETTERS):
        index = answer
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    else:
        raise LlamatronError(f"{source}: malformed row: answer {answer!r} is not one of A, B, C, D")
    question = str(row["question"])
    if not question.strip():
        raise LlamatronError(f"{source}: malformed row: the question is empty")
    return Question(
        question=question, choices=tuple(str(row[c.lower()]) for c in LETTERS), answer=index, source=source
    )
