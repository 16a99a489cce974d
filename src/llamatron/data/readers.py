"""Input corpora for preprocessing: JSONL, JSON arrays, .gz / .zst compressed JSONL, parquet.

Readers yield *raw* records in batches so that parsing JSON happens in the worker processes, next to
tokenization, and the main process only moves bytes. A record is (line number, raw JSON line) for
JSONL, or (record number, already-extracted text or an error) for formats parsed here.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llamatron.errors import LlamatronError

BATCH_BYTES = 1 << 20  # ~1 MB of input per work item: large enough to amortise IPC, small for ordering


@dataclass(kw_only=True)
class RawBatch:
    """A run of consecutive records from one file."""

    path: str
    first_line: int
    """1-based line (or record) number of the first record."""
    lines: list[bytes] | None = None
    """JSONL: the raw lines, parsed by the worker."""
    texts: list[str | None] | None = None
    """Pre-parsed formats: the text per record, None where it is missing."""
    errors: list[str | None] | None = None
    """Pre-parsed formats: why a record has no text."""
    nbytes: int = 0


def input_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".zst", ".zstd")):
        return "zst"
    if name.endswith(".gz"):
        return "gz"
    return "json"


def _open_binary(path: Path, fmt: str) -> io.BufferedIOBase:
    if fmt == "gz":
        return gzip.open(path, "rb")
    if fmt == "zst":
        try:
            import zstandard
        except ImportError:
            raise LlamatronError(f"{path} is zstd-compressed; install the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def check_inputs(paths: list[Path]) -> None:
    if not paths:
        raise LlamatronError("no --input files given; pass one or more JSONL/JSON/parquet files")
    for path in paths:
        if not path.is_file():
            raise LlamatronError(f"input file {path} does not exist")


def read_batches(path: Path, *, json_key: str) -> Iterator[RawBatch]:
    """Consecutive batches of ~1 MB of records from one input file."""
    fmt = input_format(path)
    if fmt == "parquet":
        yield from _parquet_batches(path, json_key=json_key)
        return
    with _open_binary(path, fmt) as handle:
        head = handle.peek(64)[:64] if hasattr(handle, "peek") else b""
        if head.lstrip()[:1] == b"[":
            yield from _json_array_batches(path, handle.read(), json_key=json_key)
            return
        yield from _line_batches(path, handle)


def _line_batches(path: Path, handle) -> Iterator[RawBatch]:
    lines: list[bytes] = []
    size = 0
    first = 1
    number = 0
    for number, line in enumerate(handle, 1):  # noqa: B007 - number is the last line read
        lines.append(line)
        size += len(line)
        if size >= BATCH_BYTES:
            yield RawBatch(path=str(path), first_line=first, lines=lines, nbytes=size)
            lines, size, first = [], 0, number + 1
    if lines:
        yield RawBatch(path=str(path), first_line=first, lines=lines, nbytes=size)


def _json_array_batches(path: Path, data: bytes, *, json_key: str) -> Iterator[RawBatch]:
    try:
        records = json.loads(data)
    except json.JSONDecodeError as err:
        raise LlamatronError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    texts, errors = [], []
    for record in records:
        text, error = extract_text(record, json_key=json_key)
        texts.append(text)
        errors.append(error)
    step = 4096
    for start in range(0, len(texts), step):
        yield RawBatch(
            path=str(path), first_line=start + 1, texts=texts[start : start + step],
            errors=errors[start : start + step], nbytes=len(data) * min(step, len(texts) - start) // max(len(texts), 1),
        )


def _parquet_batches(path: Path, *, json_key: str) -> Iterator[RawBatch]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlamatronError(f"{path} is parquet; install the pyarrow package (pip install pyarrow)") from None
    parquet = pq.ParquetFile(path)
    if json_key not in parquet.schema_arrow.names:
        raise LlamatronError(
            f"{path}: parquet column {json_key!r} not found (columns: {', '.join(parquet.schema_arrow.names)}); "
            f"pass --json-key with the text column"
        )
    number = 1
    for batch in parquet.iter_batches(columns=[json_key], batch_size=4096):
        column = batch.column(0).to_pylist()
        texts = [t if isinstance(t, str) else None for t in column]
        errors = [None if isinstance(t, str) else f"column {json_key!r} is {type(t).__name__}, not text" for t in column]
        yield RawBatch(path=str(path), first_line=number, texts=texts, errors=errors, nbytes=batch.nbytes)
        number += len(column)


def extract_text(record: object, *, json_key: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not) for one parsed record."""
    if not isinstance(record, dict):
        return None, f"record is a JSON {type(record).__name__}, not an object"
    if json_key not in record:
        keys = ", ".join(list(record)[:8])
        return None, f"key {json_key!r} missing (keys: {keys}); pass --json-key"
    text = record[json_key]
    if not isinstance(text, str):
        return None, f"key {json_key!r} holds a {type(text).__name__}, not text"
    return text, None


def parse_lines(lines: list[bytes], *, json_key: str) -> tuple[list[str | None], list[str | None]]:
    """Texts and errors for raw JSONL lines; a blank line is no record (text and error both None)."""
    texts: list[str | None] = []
    errors: list[str | None] = []
    loads = json.loads
    for line in lines:
        try:
            record = loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            texts.append(None)
            errors.append(f"malformed JSON ({err})" if line.strip() else None)
            continue
        if type(record) is dict and type(record.get(json_key)) is str:  # the fast, common case
            texts.append(record[json_key])
            errors.append(None)
            continue
        text, error = extract_text(record, json_key=json_key)
        texts.append(text)
        errors.append(error)
    return texts, errors
