"""HF <-> Megatron-Core conversion and Megatron-Core resharding, streaming.

Tensors flow from input files to output files without the whole model in memory: a Megatron shard
(one TP rank of one PP stage) is built from only the rows/columns it needs, read through safetensors
slices or one merged layer at a time, saved, and dropped before the next. Input files are reopened
per shard so memory-mapped pages of finished shards are released too. Outputs appear whole: they are
written into a temporary directory renamed into place, under a lock that keeps two conversions from
writing the same place.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from llamatron.checkpoint import keymaps, mcore
from llamatron.checkpoint.atomic import atomic_output_dir
from llamatron.checkpoint.hf import (
    IGNORED_SUFFIXES,
    LLAMA3_VOCAB_SIZE,
    TOKENIZER_FILES,
    HFCheckpointReader,
    HFCheckpointWriter,
    expected_hf_shapes,
    hf_name,
)
from llamatron.checkpoint.keymaps import ShardPlan
from llamatron.errors import LlamatronError, collect_problems


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Refuse to write `out` while another process writes it: an flock on a hidden sibling file
    (released by the kernel if that process dies, so a crash leaves no stale lock)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LlamatronError(
            f"output directory {out} is in use by another llamatron process (pid {holder}, lock {lock_path}); "
            "wait for it to finish or choose another --out"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


class _Progress:
    """A rich bar on a terminal; otherwise a log line per step with rate and ETA."""

    def __init__(self, *, what: str, total_bytes: int, steps: int) -> None:
        self.what, self.total, self.steps = what, max(total_bytes, 1), steps
        self.done = 0
        self.start = time.monotonic()
        self._bar = None
        # Small jobs finish in a blink: only the closing summary line.
        self.quiet = total_bytes < 2**28
        if sys.stderr.isatty() and not self.quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(what, total=self.total)

    def step(self, label: str, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes, description=f"{self.what}: {label}")
            return
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = max(self.total - self.done, 0) / rate if rate > 0 else 0.0
        print(f"llamatron: {self.what}: {label} done, {self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB, "
              f"{rate / 2**20:.0f} MiB/s, ETA {eta:.0f} s", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elapsed = time.monotonic() - self.start
        print(f"llamatron: {self.what}: {self.done / 2**30:.2f} GiB in {elapsed:.1f} s", file=sys.stderr)


def _nbytes(state: dict[str, torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if t is not None)


class _LayerwiseHFRead:
    """keymaps.Read over a HF directory through safetensors slices (only the requested rows/columns
    are touched), reopening the files at each new layer so the memory-mapped pages of finished layers
    leave this process's resident memory (build_shard keeps no views past a layer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: HFCheckpointReader | None = None
        self._unit: str | None = None

    def __call__(self, name: str, *, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else name
        if self._reader is None or unit != self._unit:
            self.close()
            self._reader, self._unit = HFCheckpointReader(self.path), unit
        part = self._reader.get_slice(hf_name(name))
        if cols is not None:
            return part[rows or slice(None), cols]
        return part[rows] if rows is not None else part[:]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def check_hf_source(reader: HFCheckpointReader) -> None:
    """Every tensor the config needs, with its shape, and nothing else (a stray bias means another model)."""
    expected = expected_hf_shapes(reader.config)
    stored = {n for n in reader.names() if not n.endswith(IGNORED_SUFFIXES)}
    if reader.config.tie_word_embeddings:
        stored.discard("lm_head.weight")
    problems = []
    if missing := sorted(set(expected) - stored):
        problems.append(f"missing tensors {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected := sorted(stored - set(expected)):
        problems.append(f"unexpected tensors {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} "
                        "(not a plain LlamaForCausalLM?)")
    problems += [f"{n} has shape {reader.shape(n)}, config.json implies {s}"
                 for n, s in expected.items() if n in stored and reader.shape(n) != s]
    collect_problems(problems, what=f"HF checkpoint {reader.path}")


def write_mcore_shards(
    open_source: Callable[[], contextlib.AbstractContextManager[keymaps.Read]], plan: ShardPlan, out: Path, *,
    dtype: torch.dtype, pad_vocab_multiple: int, force: bool, copy_files: Iterable[Path] = (), source_bytes: int,
) -> Path:
    """Write `plan`'s shards as a `release` checkpoint under `out`, one (tp, pp) shard at a time.
    `open_source()` is entered once per shard (a fresh reader releases the previous shard's mapped pages)."""
    args = mcore.make_args(plan, dtype=dtype, pad_vocab_multiple=pad_vocab_multiple)
    progress = _Progress(what=f"writing TP{plan.tp} x PP{plan.pp} ({plan.layout})", total_bytes=source_bytes,
                         steps=plan.tp * plan.pp)
    try:
        with output_lock(out), atomic_output_dir(out, force=force) as tmp:
            for pp_rank in range(plan.pp):
                for tp_rank in range(plan.tp):
                    with open_source() as source:
                        state = keymaps.build_shard(source, plan, tp_rank=tp_rank, pp_rank=pp_rank, dtype=dtype)
                    path = mcore.save_shard(tmp / "release", state, args=args, plan=plan, tp_rank=tp_rank,
                                            pp_rank=pp_rank, iteration="release")
                    progress.step(path.parent.name, _nbytes(state))
                    del state
            mcore.write_tracker(tmp, "release")
            for file in copy_files:
                shutil.copyfile(file, tmp / file.name)
    finally:
        progress.close()
    return out


@contextlib.contextmanager
def _open_hf_read(path: Path) -> Iterator[keymaps.Read]:
    read = _LayerwiseHFRead(path)
    try:
        yield read
    finally:
        read.close()


def hf_to_mcore(
    hf_dir: Path | str, out: Path | str, *, tp: int, pp: int, dtype: torch.dtype | None = None, layout: str = "pai",
    pp_layers: list[int] | None = None, pad_vocab_multiple: int = 1, force: bool = False,
) -> Path:
    """Convert a HF Llama directory to a Megatron-Core `release` checkpoint of TP x PP shards.
    Tokenizer files are copied beside the tracker so `mcore_to_hf` can restore them."""
    hf_dir, out = Path(hf_dir), Path(out)
    with HFCheckpointReader(hf_dir) as reader:
        check_hf_source(reader)
        config, dtype = reader.config, dtype or reader.dtype
        source_bytes = sum(torch.Size(reader.shape(n)).numel() for n in reader.names()) * dtype.itemsize
    plan = keymaps.make_plan(config, tp=tp, pp=pp, layout=layout, pp_layers=pp_layers,
                             pad_vocab_multiple=pad_vocab_multiple)
    tokenizer_files = [hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    return write_mcore_shards(
        lambda: _open_hf_read(hf_dir), plan, out, dtype=dtype, pad_vocab_multiple=pad_vocab_multiple,
        force=force, copy_files=tokenizer_files, source_bytes=source_bytes,
    )


def mcore_to_mcore(
    mcore_dir: Path | str, out: Path | str, *, tp: int, pp: int, layout: str | None = None,
    pp_layers: list[int] | None = None, pad_vocab_multiple: int | None = None, dtype: torch.dtype | None = None,
    iteration: int | str | None = None, force: bool = False,
) -> Path:
    """Reshard a Megatron-Core checkpoint to another TP x PP (and layout). Optimizer and RNG state
    are not carried over: the result is a `release` checkpoint, as a conversion writes."""
    mcore_dir, out = Path(mcore_dir), Path(out)
    reader = mcore.McoreCheckpointReader(mcore_dir, iteration=iteration)
    multiple = pad_vocab_multiple or int(getattr(reader.args, "make_vocab_size_divisible_by", None) or 1)
    plan = keymaps.make_plan(reader.config, tp=tp, pp=pp, layout=layout or reader.plan.layout, pp_layers=pp_layers,
                             pad_vocab_multiple=multiple)
    dtype = dtype or reader.dtype
    source_bytes = reader.config.num_params() * dtype.itemsize
    tokenizer_files = [mcore_dir / f for f in TOKENIZER_FILES if (mcore_dir / f).is_file()]
    return write_mcore_shards(lambda: contextlib.nullcontext(reader.read), plan, out, dtype=dtype, pad_vocab_multiple=multiple, force=force,
                              copy_files=tokenizer_files, source_bytes=source_bytes)


def default_tokenizer(mcore_dir: Path, *, vocab_size: int) -> str | Path | None:
    """Tokenizer files saved beside the checkpoint by hf_to_mcore, else Llama 3's for its vocabulary."""
    if any((mcore_dir / f).is_file() for f in TOKENIZER_FILES):
        return mcore_dir
    return "llama3" if vocab_size == LLAMA3_VOCAB_SIZE else None


def mcore_to_hf(
    mcore_dir: Path | str, out: Path | str, *, dtype: torch.dtype | None = None, tokenizer: str | Path | None = None,
    iteration: int | str | None = None, force: bool = False, max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write a complete HF directory (weights, config.json from `args`, tokenizer) from a Megatron-Core
    checkpoint of any TP x PP; optimizer entries in the shards are ignored.

    Each HF tensor is described by byte ranges of the shard files (checkpoint/stored.py): tensors
    joined along rows (q/k/v, gate/up, the vocabulary, norms) are copied into the output by the
    kernel (copy_file_range, as `cp` does) and never enter this process's memory; o_proj and
    down_proj, joined along columns, pass through one reused buffer (read, join, write). A dtype
    change reads through memory, 64 MiB at a time. `max_shard_bytes` (2 GiB) sizes the output files."""
    mcore_dir, out = Path(mcore_dir), Path(out)
    reader = mcore.McoreCheckpointReader(mcore_dir, iteration=iteration)
    dtype = dtype or reader.dtype
    if tokenizer is None:
        tokenizer = default_tokenizer(mcore_dir, vocab_size=reader.config.vocab_size)
    progress = _Progress(what="writing HF", total_bytes=reader.config.num_params() * dtype.itemsize,
                         steps=reader.config.num_layers + 3)
    pending = 0

    def written(name: str, nbytes: int) -> None:
        # Layers end with their norms (keymaps.layer_pieces): one progress step per layer.
        nonlocal pending
        pending += nbytes
        name = name.removeprefix("model.")
        if not name.startswith("layers.") or name.endswith("post_attention_layernorm.weight"):
            progress.step(name.rsplit(".", 2)[0] if name.startswith("layers.") else name, pending)
            pending = 0

    try:
        with output_lock(out), HFCheckpointWriter(out, config=reader.config, dtype=dtype, force=force,
                                                  tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                                                  on_written=written) as writer:
            for name, tensor in reader.stored_tensors():
                writer.write(hf_name(name), tensor, owned=True)  # a StoredTensor, or one merged afresh
    finally:
        progress.close()
    return out
