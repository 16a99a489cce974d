"""SFT samples: records -> chat token ids with pre-shifted labels -> rows (padded or packed) -> a dataset.

Labels (the seed's choice, as Pai-Megatron-Patch trains): every token of an assistant turn is a
target, its header (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`), its content and its
`<|eot_id|>`; everything else (BOS, system and user turns) is masked with -100. `train_on_prompt`
trains every token; `train_turns="last"` trains only the final assistant turn of a multi-turn record.
Labels are pre-shifted (labels[i] is the target at position i, i.e. tokens[i+1] when that token is
trained), which is also how the SFT idxmap stores them (llamatron.data.sft_idxmap).

Two sources give the same rows for the same data and options: raw JSON/JSONL (tokenized once, cached
under a key of the input bytes, the options and the tokenizer) and a preprocessed SFT idxmap.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamatron.checkpoint.atomic import atomic_write_bytes
from llamatron.data.packing import IGNORE_INDEX, PackedRow, best_fit_decreasing, build_row, one_per_row
from llamatron.data.sft_records import load_records
from llamatron.errors import LlamatronError

CACHE_VERSION = 1


@dataclass(kw_only=True, frozen=True)
class SFTOptions:
    """How records become training rows; every field is part of the tokenization cache key."""

    seq_len: int
    """Row length S (the seed's PAD_LEN in raw mode, SEQ_LEN for an idxmap)."""
    packing: bool = False
    """Pack several samples per row (best-fit decreasing), attention isolated between them."""
    format: str = "auto"
    """Record format: auto, alpaca, query, messages or sharegpt (llamatron.data.sft_records)."""
    on_error: str = "raise"
    """A bad record stops with an error naming it (raise) or is counted and left out (skip)."""
    train_on_prompt: bool = False
    """Train on every token, prompts included (not only the assistant turns)."""
    train_turns: str = "all"
    """Multi-turn records: train every assistant turn (all) or only the final one (last)."""
    default_system: bool = False
    """Insert the seed's Llama 3.1 system block where a record has no system message."""
    truncate: bool = False
    """Samples longer than seq_len are cut to seq_len (True) or dropped and counted (False)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise LlamatronError(f"SFT seq_len must be at least 2, got {self.seq_len}")
        if self.train_turns not in ("all", "last"):
            raise LlamatronError(f"train_turns must be all or last, got {self.train_turns!r}")


@dataclass(kw_only=True)
class EncodedSamples:
    """Tokenized samples, concatenated: sample k is ids[offsets[k]:offsets[k+1]] (and its labels)."""

    ids: np.ndarray  # (total,) int32
    labels: np.ndarray  # (total,) int32, pre-shifted
    offsets: np.ndarray  # (n + 1,) int64
    stats: dict[str, Any] = field(default_factory=dict)
    """records, skipped (by reason), dropped_too_long, truncated, dropped_no_target, samples, tokens."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[k], self.offsets[k + 1]
        return self.ids[lo:hi], self.labels[lo:hi]


def sample_labels(ids: Sequence[int], segments: Sequence[Any], *, train_on_prompt: bool, train_turns: str) -> np.ndarray:
    """Which tokens are trained (from the chat segments), as pre-shifted labels. (n,) int64."""
    n = len(ids)
    trained = np.zeros(n, dtype=bool)
    if train_on_prompt:
        trained[:] = True
    else:
        spans = [s for s in segments if s.role == "assistant"]
        if train_turns == "last":
            spans = spans[-1:]
        for span in spans:
            trained[span.start : span.end] = True
    ids_arr = np.asarray(ids, dtype=np.int64)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(trained[1:], ids_arr[1:], IGNORE_INDEX)
    return labels


def encode_messages(tokenizer: Any, messages: Sequence[dict[str, str]], *, options: SFTOptions) -> tuple[np.ndarray, np.ndarray]:
    """One conversation as (ids, pre-shifted labels) with the tokenizer's chat format, not truncated."""
    from llamatron.tokenizer.chat import encode_chat

    encoding = encode_chat(tokenizer, list(messages), bos=True, default_system=options.default_system)
    labels = sample_labels(
        encoding.ids, encoding.segments, train_on_prompt=options.train_on_prompt, train_turns=options.train_turns
    )
    return np.asarray(encoding.ids, dtype=np.int64), labels


def fit_length(ids: np.ndarray, labels: np.ndarray, *, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a sample to seq_len tokens; the new last token has no target inside the sample."""
    ids, labels = ids[:seq_len], labels[:seq_len].copy()
    labels[-1] = IGNORE_INDEX
    return ids, labels


def encode_records(
    path: str | Path, *, tokenizer: Any, options: SFTOptions, progress: Callable[[int, int], None] | None = None
) -> EncodedSamples:
    """Read, tokenize and length-filter every record of a JSON/JSONL file."""
    record_set = load_records(path, format=options.format, on_error=options.on_error)
    ids_parts, label_parts, lengths = [], [], []
    dropped: Counter[str] = Counter()
    for k, record in enumerate(record_set.records):
        ids, labels = encode_messages(tokenizer, record.messages, options=options)
        if len(ids) > options.seq_len:
            if not options.truncate:
                dropped["dropped_too_long"] += 1
                continue
            ids, labels = fit_length(ids, labels, seq_len=options.seq_len)
            dropped["truncated"] += 1
            if (labels == IGNORE_INDEX).all():
                dropped["dropped_no_target"] += 1
                continue
        ids_parts.append(ids)
        label_parts.append(labels)
        lengths.append(len(ids))
        if progress is not None:
            progress(k + 1, len(record_set.records))
    stats = {
        "records": record_set.total, "format": record_set.format, "skipped": record_set.skipped,
        "dropped_too_long": dropped["dropped_too_long"], "truncated": dropped["truncated"],
        "dropped_no_target": dropped["dropped_no_target"], "samples": len(lengths), "tokens": int(sum(lengths)),
    }
    return EncodedSamples(
        ids=np.concatenate(ids_parts).astype(np.int32) if ids_parts else np.zeros(0, np.int32),
        labels=np.concatenate(label_parts).astype(np.int32) if label_parts else np.zeros(0, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        stats=stats,
    )


# ---- tokenization cache ------------------------------------------------------------------------
def cache_key(path: str | Path, *, tokenizer: Any, options: SFTOptions) -> str:
    """sha256 over the input's bytes, the options and the tokenizer (its spec, vocabulary size and the
    ids of a probe conversation, which change with the chat template or the special tokens)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    from llamatron.tokenizer.chat import encode_chat

    probe = [{"role": "user", "content": "q 问"}, {"role": "assistant", "content": "a"}]
    try:
        probe_ids = encode_chat(tokenizer, [{"role": "system", "content": "s"}, *probe]).ids
    except Exception:  # some chat templates refuse system messages; the probe without one still tells them apart
        probe_ids = encode_chat(tokenizer, probe).ids
    fingerprint = {
        "version": CACHE_VERSION, "options": asdict(options), "spec": str(getattr(tokenizer, "spec", "")),
        "vocab": int(tokenizer.vocab_size), "probe": list(probe_ids), "pad": getattr(tokenizer, "pad_id", None),
    }
    digest.update(json.dumps(fingerprint, sort_keys=True).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAMATRON_CACHE", Path.home() / ".cache" / "llamatron")) / "sft"


def _array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_cache(file: Path, samples: EncodedSamples, *, key: str) -> None:
    meta = {"key": key, "stats": samples.stats, "digest": _array_digest(samples.ids, samples.labels, samples.offsets)}
    buffer = io.BytesIO()
    np.savez(buffer, ids=samples.ids, labels=samples.labels, offsets=samples.offsets, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(file, buffer.getvalue())


def load_cache(file: Path, *, key: str) -> EncodedSamples | None:
    """The cached samples if the file exists, belongs to `key` and its arrays match their digest."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            samples = EncodedSamples(ids=data["ids"], labels=data["labels"], offsets=data["offsets"], stats=meta["stats"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable: rebuild it
        return None
    if meta.get("key") != key or meta.get("digest") != _array_digest(samples.ids, samples.labels, samples.offsets):
        return None
    return samples


def encode_records_cached(
    path: str | Path, *, tokenizer: Any, options: SFTOptions, cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EncodedSamples:
    """encode_records, reusing a verified cache file when the input, options and tokenizer are unchanged."""
    key = cache_key(path, tokenizer=tokenizer, options=options)
    file = (cache_dir or default_cache_dir()) / f"sft-{key[:24]}.npz"
    cached = load_cache(file, key=key)
    if cached is not None:
        return cached
    samples = encode_records(path, tokenizer=tokenizer, options=options, progress=progress)
    save_cache(file, samples, key=key)
    return samples


# ---- rows -------------------------------------------------------------------------------------
def plan_rows(samples: EncodedSamples, *, seq_len: int, packing: bool) -> list[list[int]]:
    lengths = samples.lengths.tolist()
    return (best_fit_decreasing if packing else one_per_row)(lengths, capacity=seq_len)


def pad_token_id(tokenizer: Any) -> int:
    """`<|finetune_right_pad_id|>` for Llama 3; a tokenizer without a pad token pads with its EOS."""
    pad = getattr(tokenizer, "pad_id", None)
    return int(pad) if pad is not None else int(tokenizer.eos_id)


@dataclass(kw_only=True)
class RawRows:
    """Rows built on access from tokenized samples and a packing plan."""

    samples: EncodedSamples
    bins: list[list[int]]
    seq_len: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> PackedRow:
        return build_row([self.samples.sample(k) for k in self.bins[i]], seq_len=self.seq_len, pad_id=self.pad_id)


class SFTDataset:
    """Map-style dataset of training rows, shuffled deterministically.

    Item i (any i >= 0) is row order_e[i % n] of epoch e = i // n, where order_e is a permutation drawn
    from (seed, e); so the whole state needed to resume is the number of samples consumed. Items are
    dicts of (S,) int64 arrays: tokens, labels (pre-shifted, -100 masked), positions, document_ids."""

    def __init__(self, rows: Any, *, seed: int = 1234, shuffle: bool = True, stats: dict | None = None) -> None:
        if len(rows) == 0:
            raise LlamatronError("the SFT dataset has no rows (every record was skipped or dropped); check the summary")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.stats = stats or {}
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._epoch_order[1]

    def row_index(self, i: int) -> int:
        epoch, j = divmod(int(i), len(self.rows))
        return int(self.order(epoch)[j])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.rows[self.row_index(i)].item()


def raw_rows(path: str | Path, *, tokenizer: Any, options: SFTOptions, cache_dir: Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> RawRows:
    samples = encode_records_cached(path, tokenizer=tokenizer, options=options, cache_dir=cache_dir, progress=progress)
    bins = plan_rows(samples, seq_len=options.seq_len, packing=options.packing)
    return RawRows(samples=samples, bins=bins, seq_len=options.seq_len, pad_id=pad_token_id(tokenizer))


def build_sft_dataset(
    path: str | Path, *, fmt: str = "raw", tokenizer: Any = "llama3", seq_len: int, packing: bool = False,
    seed: int = 1234, shuffle: bool = True, cache_dir: Path | None = None, **options: Any,
) -> SFTDataset:
    """The trainer's entry point. fmt="raw": a JSON/JSONL file tokenized with `tokenizer` (a spec for
    load_tokenizer or a tokenizer) into rows of seq_len; fmt="idxmap": an SFT idxmap prefix (its own S,
    which must equal seq_len). Extra keyword options are SFTOptions fields (train_on_prompt, ...)."""
    if fmt == "idxmap":
        from llamatron.data.sft_idxmap import SFTIdxmap

        idxmap = SFTIdxmap(path)
        if idxmap.seq_len != seq_len:
            raise LlamatronError(
                f"SFT idxmap {idxmap.prefix} was built with seq_len {idxmap.seq_len}, but training uses {seq_len}; "
                f"set the sequence length to {idxmap.seq_len} or rebuild with preprocess-sft --seq-len {seq_len}"
            )
        return SFTDataset(idxmap, seed=seed, shuffle=shuffle)
    if fmt != "raw":
        raise LlamatronError(f"unknown SFT data format {fmt!r}; choose raw or idxmap")
    if isinstance(tokenizer, str | Path):
        from llamatron.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    opts = SFTOptions(seq_len=seq_len, packing=packing, **options)
    rows = raw_rows(path, tokenizer=tokenizer, options=opts, cache_dir=cache_dir, progress=log_progress("tokenizing SFT records"))
    return SFTDataset(rows, seed=seed, shuffle=shuffle, stats=rows.samples.stats)


def log_progress(what: str, *, every_s: float = 10.0) -> Callable[[int, int], None]:
    """A progress callback printing `what: done/total (rate/s, ETA)` to stderr at most every `every_s`."""
    start = last = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < every_s and done != total:
            return
        if done == total and now - start < every_s:
            return
        last = now
        rate = done / max(now - start, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        print(f"{what}: {done}/{total} ({rate:.0f}/s, ETA {eta:.0f}s)", file=sys.stderr, flush=True)

    return report


def summary_line(stats: dict[str, Any]) -> str:
    """One line for logs: records read, skipped, dropped, truncated, samples kept."""
    skipped = stats.get("skipped") or {}
    skipped_text = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "0"
    return (
        f"{stats.get('records', 0)} records ({stats.get('format', '?')}): skipped {skipped_text}; "
        f"{stats.get('dropped_too_long', 0)} dropped as longer than seq_len, {stats.get('truncated', 0)} truncated "
        f"({stats.get('dropped_no_target', 0)} of them dropped with nothing left to train); "
        f"{stats.get('samples', 0)} samples, {stats.get('tokens', 0)} tokens"
    )


# ---- display (llamatron data show) --------------------------------------------------------------
def render_row(row: PackedRow, tokenizer: Any, *, index: int = 0) -> Any:
    """A row as rich Text: each sample decoded, masked spans (no loss) dim and wrapped in ⟦ ⟧, trained
    spans green, the padding tail summarised. Token j is trained when labels[j - 1] is not -100."""
    from rich.text import Text

    trained = np.zeros(len(row.tokens), dtype=bool)
    trained[1:] = row.labels[:-1] != IGNORE_INDEX
    used = int(sum(row.sample_lengths))
    text = Text(
        f"row {index}: {len(row.sample_lengths)} sample(s) of {list(row.sample_lengths)} tokens, "
        f"{int(trained.sum())} trained, {len(row.tokens) - used} padding\n",
        style="bold",
    )
    start = 0
    for k, length in enumerate(row.sample_lengths):
        text.append(f"[sample {k}] ", style="cyan")
        span = slice(start, start + length)
        ids, flags = row.tokens[span], trained[span]
        cuts = [0, *(np.flatnonzero(np.diff(flags.astype(np.int8))) + 1).tolist(), length]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            piece = tokenizer.decode(ids[lo:hi].tolist())
            if flags[lo]:
                text.append(piece, style="green")
            else:
                text.append(f"⟦{piece}⟧", style="dim")
        text.append("\n")
        start += length
    if used < len(row.tokens):
        text.append(f"[padding] ⟦id {int(row.tokens[used])} × {len(row.tokens) - used}⟧\n", style="dim")
    return text


def show_rows(path: str | Path, *, tokenizer: Any, count: int = 3, start: int = 0, seq_len: int = 2048,
              packing: bool = False) -> list[Any]:
    """Rendered rows start..start+count-1 of an SFT idxmap prefix or (with the given seq_len and
    packing) a raw JSON/JSONL file, for `llamatron data show`."""
    if Path(path).suffix in (".json", ".jsonl"):
        rows: Any = raw_rows(path, tokenizer=tokenizer, options=SFTOptions(seq_len=seq_len, packing=packing))
    else:
        from llamatron.data.sft_idxmap import SFTIdxmap

        rows = SFTIdxmap(path)
    stop = min(start + count, len(rows))
    return [render_row(rows[i], tokenizer, index=i) for i in range(start, stop)]


def is_sft_data(path: str) -> bool:
    """Raw records (.json/.jsonl) or an idxmap written by preprocess-sft (its .sft.json summary beside it)."""
    if path.endswith((".json", ".jsonl")):
        return True
    from llamatron.data.sft_idxmap import IDXMAP_SUFFIX

    return any(Path(p + ".sft.json").exists() for p in (path, path + IDXMAP_SUFFIX))


def show_sft(paths: Sequence[str], *, seq_len: int, seed: int, count: int, tokenizer: str, as_json: bool) -> None:
    """`llamatron data show` for SFT data: the first `count` rows in training order (seed), decoded with
    masked spans marked, or as JSON items (tokens, labels, positions, document_ids)."""
    if len(paths) != 1:
        raise LlamatronError(f"SFT data is one JSON/JSONL file or one SFT idxmap prefix, got {list(paths)}")
    path = paths[0]
    raw = path.endswith((".json", ".jsonl"))
    dataset = build_sft_dataset(path, fmt="raw" if raw else "idxmap", tokenizer=tokenizer, seq_len=seq_len, seed=seed)
    shown = range(min(count, len(dataset)))
    if as_json:
        print(json.dumps([{k: v.tolist() for k, v in dataset[i].items()} for i in shown]))
        return
    from rich.console import Console

    from llamatron.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    console = Console(highlight=False)
    if raw:
        console.print(summary_line(dataset.stats))
    console.print("⟦…⟧ = masked (label -100, no loss); the rest is trained.", style="dim")
    for i in shown:
        j = dataset.row_index(i)
        console.print(f"--- sample {i} (row {j}) ---", style="bold")
        console.print(render_row(dataset.rows[j], tok, index=j))
