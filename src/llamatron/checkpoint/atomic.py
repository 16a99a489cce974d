"""Outputs that appear whole or not at all: write under a temporary name, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llamatron.errors import LlamatronError


def check_output_dir(out: Path, *, force: bool) -> None:
    """Refuse an existing non-empty output directory unless `force` (it is then replaced on success)."""
    if out.exists() and not out.is_dir():
        raise LlamatronError(f"output {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LlamatronError(f"output directory {out} is not empty; choose another path or pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed.

    The temporary directory sits next to `out` so the final rename stays on one filesystem."""
    out = Path(out)
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write a file under a temporary name in the same directory, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
