"""Text corpora to Megatron indexed datasets, as Megatron-LM's tools/preprocess_data.py does, faster.

One document per record, one sequence per document: [BOS] + tokens + [EOD] (BOS with --add-bos, EOD
with --append-eod; an empty text stays an empty document, as Megatron writes it). Output
`{prefix}_{key}_document.{bin,idx}`, uint16 when the vocabulary fits, else int32.

Speed: the main process only reads ~1 MB batches of raw lines; worker processes parse the JSON,
tokenize the whole batch in one tiktoken call and send back one numpy array per batch (not a Python
list per document), and the main process appends each batch to the .bin with a single write.
Batches come back in input order (Pool.imap), so the output does not depend on the worker count.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamatron.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from llamatron.data.readers import RawBatch, check_inputs, parse_lines, read_batches
from llamatron.errors import LlamatronError

MAX_ERROR_EXAMPLES = 5


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[Path]
    """JSONL / JSON array / .gz / .zst / parquet files, processed in order into one dataset."""
    output_prefix: str
    """Output is {output_prefix}_{json_key}_document.{bin,idx}."""
    json_key: str = "text"
    """The record field (parquet: column) holding the text."""
    tokenizer: str = "llama3"
    """'llama3' or a HF tokenizer directory."""
    append_eod: bool = False
    """Append the tokenizer's end-of-text id to every non-empty document (the seed uses it)."""
    add_bos: bool = False
    """Prepend <|begin_of_text|> (the seed does not)."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Tokenizer processes; 1 runs in this process."""
    on_error: str = "fail"
    """'fail' stops at the first bad record; 'skip' leaves it out and reports it."""

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise LlamatronError(f"--on-error {self.on_error!r} is not known; use fail or skip")
        if self.workers < 1:
            raise LlamatronError(f"--workers {self.workers} must be at least 1")
        self.inputs = [Path(p) for p in self.inputs]

    @property
    def prefix(self) -> str:
        return f"{self.output_prefix}_{self.json_key}_document"


@dataclass(kw_only=True)
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    prefix: str = ""

    def rates(self) -> dict[str, float]:
        t = max(self.seconds, 1e-9)
        return {"docs_per_s": self.documents / t, "tokens_per_s": self.tokens / t, "mb_per_s": self.bytes / t / 2**20}


@dataclass(kw_only=True, frozen=True)
class _EncodeSettings:
    tokenizer: str
    json_key: str
    add_bos: bool
    append_eod: bool
    dtype: str


@dataclass(kw_only=True)
class _Encoded:
    tokens: np.ndarray  # (sum of lengths,) every kept document's ids, concatenated
    lengths: np.ndarray  # (kept documents,) ids per document, 0 for an empty text
    errors: list[tuple[str, int, str]]  # (file, line, why) of records left out
    nbytes: int


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str):
    # One tokenizer per worker process, built on its first batch (tokenizers are rebuilt from their
    # spec rather than pickled from the parent).
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def _encode_texts(tok, texts: list[str]) -> list[list[int]]:
    try:
        # Each worker is one process on one core: tiktoken's own thread pool would only oversubscribe.
        return tok.encode_batch(texts, num_threads=1)
    except TypeError:
        return tok.encode_batch(texts)


def encode_batch(batch: RawBatch, settings: _EncodeSettings) -> _Encoded:
    """Parse and tokenize one batch (runs in a worker process)."""
    tok = _tokenizer(settings.tokenizer)
    if batch.lines is not None:
        texts, errors = parse_lines(batch.lines, json_key=settings.json_key)
    else:
        texts, errors = batch.texts, batch.errors
    problems = [
        (batch.path, batch.first_line + i, why) for i, (text, why) in enumerate(zip(texts, errors, strict=True))
        if text is None and why is not None
    ]
    kept = [t for t in texts if t is not None]
    ids = _encode_texts(tok, kept)
    bos, eod = tok.bos_id, tok.eos_id
    if settings.add_bos:
        ids = [[bos, *doc] for doc in ids]
    if settings.append_eod:
        # Megatron appends EOD only to a non-empty document: an empty text stays an empty document.
        for doc in ids:
            if doc:
                doc.append(eod)
    lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=settings.dtype, count=int(lengths.sum()))
    return _Encoded(tokens=tokens, lengths=lengths, errors=problems, nbytes=batch.nbytes)


def _batches(config: PreprocessConfig) -> Iterator[RawBatch]:
    for path in config.inputs:
        yield from read_batches(path, json_key=config.json_key)


def _encoded_batches(config: PreprocessConfig, settings: _EncodeSettings) -> Iterator[_Encoded]:
    work = functools.partial(encode_batch, settings=settings)
    if config.workers == 1:
        yield from map(work, _batches(config))
        return
    # Workers import this module and rebuild the tokenizer from its spec. forkserver, not fork: forking a
    # process whose threads hold locks (torch's pools, tiktoken's batch threads, a compile worker) can leave
    # a child deadlocked (a CI run hung 20 minutes in this pool); the fork server is a fresh, single-threaded
    # process. Its workers import only this module's light dependencies (numpy, tiktoken; never torch), so
    # start-up stays well under a second.
    context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    with context.Pool(config.workers) as pool:
        yield from pool.imap(work, _batches(config), chunksize=1)


def preprocess(config: PreprocessConfig, *, on_progress: Callable[[PreprocessStats], None] | None = None) -> PreprocessStats:
    """Tokenize `config.inputs` into one indexed dataset; returns counts and rates."""
    check_inputs(config.inputs)
    tok = _tokenizer(config.tokenizer)
    dtype = optimal_dtype(tok.vocab_size)
    settings = _EncodeSettings(
        tokenizer=tok.spec, json_key=config.json_key, add_bos=config.add_bos, append_eod=config.append_eod,
        dtype=dtype.str,
    )
    stats = PreprocessStats(prefix=config.prefix)
    start = time.perf_counter()
    Path(config.prefix).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(config.prefix, dtype=dtype) as writer:
        for encoded in _encoded_batches(config, settings):
            if encoded.errors:
                path, line, why = encoded.errors[0]
                if config.on_error == "fail":
                    raise LlamatronError(f"{path}:{line}: {why}; fix the record or pass --on-error skip")
                stats.skipped += len(encoded.errors)
                room = MAX_ERROR_EXAMPLES - len(stats.skipped_examples)
                stats.skipped_examples += [f"{p}:{n}: {w}" for p, n, w in encoded.errors[:room]]
            writer.add_documents(encoded.tokens, encoded.lengths)
            stats.documents += len(encoded.lengths)
            stats.tokens += len(encoded.tokens)
            stats.bytes += encoded.nbytes
            stats.seconds = time.perf_counter() - start
            if on_progress is not None:
                on_progress(stats)
        if stats.documents == 0:
            inputs = ", ".join(str(p) for p in config.inputs)
            if stats.skipped:
                raise LlamatronError(f"all {stats.skipped} records of {inputs} were skipped; first: {stats.skipped_examples[0]}")
            raise LlamatronError(f"{inputs} holds no records; check the input files")
    stats.seconds = time.perf_counter() - start
    return stats


def merge(inputs: list[str], output_prefix: str) -> tuple[int, int]:
    """Concatenate indexed datasets (same dtype) into one, as Megatron's tools/merge_datasets.py.
    Returns (documents, tokens)."""
    if not inputs:
        raise LlamatronError("merge needs --inputs P1 P2 ...; none given")
    datasets = [IndexedDataset(prefix) for prefix in inputs]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{ds.prefix} ({ds.dtype})" for ds in datasets)
        raise LlamatronError(f"cannot merge datasets of different dtypes: {listing}; re-run preprocess with one tokenizer")
    with IndexedDatasetWriter(output_prefix, dtype=datasets[0].dtype) as writer:
        for ds in datasets:
            writer.add_dataset(ds)
    return sum(len(ds) for ds in datasets), sum(ds.num_tokens for ds in datasets)
