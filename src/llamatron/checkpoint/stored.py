"""Tensors left in their files: byte ranges of checkpoint shards, copied to outputs by the kernel.

Converting Megatron-Core shards to HF safetensors only moves bytes: every HF tensor is a
concatenation of pieces of the TP shard files. Pieces joined along rows (q/k/v per KV group,
gate/up halves of fc1, the vocabulary) are whole byte ranges in the output too, and `write_into`
hands each range to `copy_file_range`, as `cp` does: no page of the input is mapped into this
process and nothing is copied through its memory. Pieces joined along columns (o_proj and
down_proj, which TP splits by columns) would be one small range per row (2-7 KiB for Llama 3.1 8B
at TP4), and a system call per row is slower than reading each piece whole and joining them in
memory, so those go through a reused scratch buffer: one read, one copy, one write. A dtype change
(or a filesystem without copy_file_range) also goes through memory, a bounded chunk at a time.

The ranges come from views of tensors loaded with `map_location="meta"`: torch records where each
storage lies in the zip file (`UntypedStorage._checkpoint_offset`), and a view adds its storage
offset and strides.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamatron.errors import LlamatronError

# Bytes read per step when row-joined data must pass through memory (a dtype change, no copy_file_range).
CHUNK_BYTES = 64 * 2**20
# copy_file_range refusing this pair of files (another filesystem, an unsupported one, an old kernel).
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


class _KernelCopyUnavailable(Exception):
    pass


def file_offset(tensor: torch.Tensor) -> int | None:
    """Byte offset in its checkpoint file of a meta tensor's first element (view offsets included),
    or None when torch did not record where its storage lies (legacy non-zip files)."""
    base = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    return None if base is None else base + tensor.storage_offset() * tensor.element_size()


def strided_runs(base: int, shape: Sequence[int], strides: Sequence[int], itemsize: int) -> list[tuple[int, int]]:
    """(offset, nbytes) ranges covering a strided block in row-major order, adjacent ones merged."""
    if math.prod(shape) == 0:
        return []
    # The trailing dims that are laid out densely form one range per index of the leading dims.
    dense, expected = len(shape), 1
    while dense > 0 and (shape[dense - 1] == 1 or strides[dense - 1] == expected):
        expected *= shape[dense - 1]
        dense -= 1
    length = expected * itemsize
    runs: list[tuple[int, int]] = []
    for index in itertools.product(*(range(n) for n in shape[:dense])):
        start = base + sum(i * s for i, s in zip(index, strides, strict=False)) * itemsize
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((start, length))
    return runs


@dataclass(frozen=True)
class StoredPart:
    """One view of a tensor in a file: its row-major bytes are `runs` (offset, nbytes) of `file`."""

    file: str
    shape: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]


def stored_part(view: torch.Tensor, file: str) -> StoredPart | None:
    """A meta view loaded from `file`; None when torch did not record where it lies."""
    base = file_offset(view)
    if base is None:
        return None
    return StoredPart(file=file, shape=tuple(view.shape),
                      runs=tuple(strided_runs(base, view.shape, view.stride(), view.element_size())))


@dataclass(frozen=True)
class StoredTensor:
    """`torch.cat(parts, dim)` reshaped to `shape`, with every part still in its file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[StoredPart, ...]
    dim: int = 0

    def __post_init__(self) -> None:
        stored = sum(n for part in self.parts for _, n in part.runs)
        assert stored == math.prod(self.shape) * self.dtype.itemsize, (self.shape, self.dtype, stored)

    @property
    def _row_joined(self) -> bool:
        """The output bytes are the parts' bytes one after another (a join along the first dim)."""
        return len(self.parts) == 1 or all(math.prod(part.shape[: self.dim]) == 1 for part in self.parts)

    def read(self, *, scratch: Scratch | None = None) -> torch.Tensor:
        """The tensor in memory (read, not mapped); with `scratch`, a view of its buffer."""
        with _OpenFiles() as files:
            return self._gather(files, scratch or Scratch())

    def write_into(self, fd: int, offset: int, *, dtype: torch.dtype, scratch: Scratch | None = None) -> None:
        """Write the tensor as `dtype` (row-major bytes) at `offset` of the open file `fd`."""
        with _OpenFiles() as files:
            if not self._row_joined:
                pwrite_tensor(fd, self._gather(files, scratch or Scratch()).to(dtype), offset)
                return
            if dtype == self.dtype:
                try:
                    self._copy_in_kernel(files, fd, offset)
                    return
                except _KernelCopyUnavailable:
                    pass  # rewritten below through memory, from the start
            self._copy_through_memory(files, fd, offset, dtype=dtype, scratch=scratch or Scratch())

    def _gather(self, files: _OpenFiles, scratch: Scratch) -> torch.Tensor:
        """Each part read whole into the scratch buffer, then joined along `dim` (one copy; none
        when the parts are joined along rows: they are read into place)."""
        itemsize = self.dtype.itemsize
        total = math.prod(self.shape) * itemsize
        buffer = scratch.take(total if self._row_joined else 2 * total)
        pieces, position = [], 0
        for part in self.parts:
            begin = position
            for offset, length in part.runs:
                _pread_into(files.fd(part.file), _bytes(buffer[position : position + length]), offset, part.file)
                position += length
            pieces.append(buffer[begin:position].view(self.dtype).view(part.shape))
        if self._row_joined:
            return buffer.view(self.dtype).view(self.shape)
        out = buffer[total:].view(self.dtype)
        torch.cat(pieces, dim=self.dim, out=out.view(_joined_shape(pieces, self.dim)))
        return out.view(self.shape)

    def _copy_in_kernel(self, files: _OpenFiles, fd: int, offset: int) -> None:
        if not hasattr(os, "copy_file_range"):
            raise _KernelCopyUnavailable
        position = offset
        for part in self.parts:
            source = files.fd(part.file)
            for start, length in part.runs:
                done = 0
                while done < length:
                    try:
                        copied = os.copy_file_range(source, fd, length - done, start + done, position + done)
                    except OSError as err:
                        if err.errno in _NO_KERNEL_COPY:
                            raise _KernelCopyUnavailable from None
                        raise
                    if copied == 0:
                        raise _truncated(part.file, start + done)
                    done += copied
                position += length

    def _copy_through_memory(
        self, files: _OpenFiles, fd: int, offset: int, *, dtype: torch.dtype, scratch: Scratch
    ) -> None:
        """Read a bounded chunk of the runs, cast it, write it; the chunk ends on an element boundary."""
        itemsize = self.dtype.itemsize
        chunk = scratch.take(max(CHUNK_BYTES // itemsize, 1) * itemsize)
        buffer = _bytes(chunk)
        filled, position = 0, offset

        def flush() -> int:
            return pwrite_tensor(fd, chunk[:filled].view(self.dtype).to(dtype), position)

        for part in self.parts:
            for start, length in part.runs:
                done = 0
                while done < length:
                    step = min(length - done, len(buffer) - filled)
                    _pread_into(files.fd(part.file), buffer[filled : filled + step], start + done, part.file)
                    filled, done = filled + step, done + step
                    if filled == len(buffer):
                        position += flush()
                        filled = 0
        if filled:
            flush()


def _joined_shape(pieces: list[torch.Tensor], dim: int) -> tuple[int, ...]:
    shape = list(pieces[0].shape)
    shape[dim] = sum(piece.shape[dim] for piece in pieces)
    return tuple(shape)


class Scratch:
    """A byte buffer reused across tensors: fresh large allocations cost a page fault per 4 KiB."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes (uint8), valid until the next take."""
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # freed before the larger one is made
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.numpy()).cast("B")


class _OpenFiles:
    """Read-only descriptors opened on first use and closed together."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __enter__(self) -> _OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _truncated(file: str, offset: int) -> LlamatronError:
    return LlamatronError(f"{file} ends before byte {offset} that its index points to (truncated or corrupt?); "
                          "re-copy or re-convert it")


def _pread_into(fd: int, buffer: memoryview, offset: int, file: str) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise _truncated(file, offset + done)
        done += count


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> int:
    """os.pwrite until every byte is written (it may write fewer); returns the byte count."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
    return done


def pwrite_tensor(fd: int, tensor: torch.Tensor, offset: int) -> int:
    """Write a contiguous CPU tensor's bytes at `offset`; returns the byte count."""
    if tensor.numel() == 0:
        return 0
    # A uint8 view works for bf16, which numpy lacks.
    return pwrite_all(fd, _bytes(tensor.reshape(-1).view(torch.uint8)), offset)
