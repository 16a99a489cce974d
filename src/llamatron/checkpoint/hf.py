"""HF checkpoint directories (config.json + safetensors shards) read and written tensor by tensor.

A Llama 3.1 70B checkpoint is 140 GB in bf16, so nothing here holds a whole model: the reader opens
shards lazily (safetensors memory-maps them) and the writer keeps at most one shard in memory.
Every shard header is checked against its file size when a directory is opened, so a truncated
download fails with the file's name instead of a confusing error deep inside a conversion.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llamatron.checkpoint.atomic import atomic_output_dir
from llamatron.checkpoint.stored import Scratch, StoredTensor, pwrite_all, pwrite_tensor
from llamatron.errors import LlamatronError, collect_problems
from llamatron.model.config import LlamaConfig, from_hf_config, to_hf_config
from llamatron.model.llama import Llama, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
)
# Llama 3 vocabulary: generation stops at <|end_of_text|>, <|eom_id|> and <|eot_id|> (Meta's files).
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_ID = 128000
LLAMA3_STOP_IDS = (128001, 128008, 128009)
# Tensors some older HF Llama checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def hf_name(internal: str) -> str:
    """llamatron parameter name -> HF tensor name ("layers.0.mlp.up_proj.weight" -> "model.layers.0...")."""
    return internal if internal.startswith("lm_head.") else f"model.{internal}"


def internal_name(hf: str) -> str:
    """HF tensor name -> llamatron parameter name; names outside the model are returned unchanged."""
    return hf.removeprefix("model.")


# ---------------------------------------------------------------------------------------------
# Reading


class HFCheckpointReader:
    """A HF Llama directory: `.config` (LlamaConfig), `.hf_config` (the raw dict), tensors by HF name.

    Iterating yields (name, tensor) one at a time, shard by shard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise LlamatronError(f"HF checkpoint {self.path} {what}; pass the directory holding config.json")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise LlamatronError(f"{self.path} has no config.json; pass a HF model directory (save_pretrained output)")
        try:
            self.hf_config: dict[str, Any] = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise LlamatronError(f"{config_path} is not valid JSON ({err}); restore the file") from None
        self.config: LlamaConfig = from_hf_config(self.hf_config, source=str(config_path))
        self._headers = {file: _read_header(self.path / file) for file in self._shard_files()}
        self._weight_map = self._build_weight_map()
        self._handles: dict[str, Any] = {}

    def _shard_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            self._index = _read_index(index)
            files = sorted(set(self._index.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise LlamatronError(
                    f"{index} names shard file(s) that do not exist: {', '.join(missing)}; "
                    "copy the missing shards or re-download the checkpoint"
                )
            return files
        self._index = None
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            hint = ""
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pth")):
                hint = " (found .bin/.pth weights: llamatron reads safetensors only; re-save with save_pretrained)"
            raise LlamatronError(f"{self.path} has no *.safetensors weights{hint}")
        return files

    def _build_weight_map(self) -> dict[str, str]:
        weight_map: dict[str, str] = {}
        for file, header in self._headers.items():
            for name in header:
                if name in weight_map:
                    raise LlamatronError(
                        f"tensor {name} is stored twice in {self.path} ({weight_map[name]} and {file}); "
                        "remove the stray shard"
                    )
                weight_map[name] = file
        if self._index is not None:
            absent = [f"{name} (in {file})" for name, file in self._index.items() if weight_map.get(name) != file]
            if absent:
                shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
                raise LlamatronError(
                    f"{self.path / INDEX_FILE} lists tensors its shards do not hold: {shown}; "
                    "the checkpoint is incomplete, re-download or re-convert it"
                )
        return weight_map

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the shard header, without reading the tensor."""
        return tuple(self._header_entry(name)["shape"])

    def tensor_dtype(self, name: str) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self._header_entry(name)["dtype"])

    @property
    def dtype(self) -> torch.dtype:
        """The stored floating dtype (the most common by element count, if mixed)."""
        counts: dict[torch.dtype, int] = {}
        for header in self._headers.values():
            for entry in header.values():
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is not None and dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + _numel(entry["shape"])
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def get(self, name: str) -> torch.Tensor:
        return self._open(name).get_tensor(name)

    def get_slice(self, name: str) -> Any:
        """A lazy safetensors slice: `.get_shape()`, and `[a:b]` / `[:, a:b]` read only that part."""
        return self._open(name).get_slice(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._weight_map:
            yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _header_entry(self, name: str) -> dict[str, Any]:
        if name not in self._weight_map:
            raise LlamatronError(f"tensor {name} is not in {self.path}; it holds {len(self)} tensors, e.g. "
                                 f"{', '.join(list(self._weight_map)[:3])}")
        return self._headers[self._weight_map[name]][name]

    def _open(self, name: str) -> Any:
        self._header_entry(name)
        file = self._weight_map[name]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as err:  # safetensors raises SafetensorError and OSError subclasses
                raise LlamatronError(f"cannot read {self.path / file}: {err}; re-download or re-convert it") from None
        return self._handles[file]


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise LlamatronError(f"{path} is not a valid safetensors index ({err!r}); restore or delete it") from None
    return {str(name): str(file) for name, file in weight_map.items()}


def _read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors header against the file: 8-byte length, JSON, then tensor data
    exactly filling the rest of the file. Returns {name: {"dtype", "shape", "data_offsets"}}."""
    size = path.stat().st_size
    problem = None
    header: dict[str, Any] = {}
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if header_len < 2 or header_len > size - 8:
            problem = f"bad header length ({header_len} bytes in a {size}-byte file)"
        else:
            try:
                header = json.loads(handle.read(header_len))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            except (ValueError, UnicodeDecodeError) as err:
                problem = f"unreadable header ({err})"
    if problem is None:
        header.pop("__metadata__", None)
        problem = _check_offsets(header, data_bytes=size - 8 - header_len)
    if problem is not None:
        raise LlamatronError(f"{path} is not a valid safetensors file: {problem}; re-download or re-convert it")
    return header


def _check_offsets(header: dict[str, Any], *, data_bytes: int) -> str | None:
    end = 0
    try:
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, stop = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if begin != end:
                return f"tensor {name} starts at byte {begin}, expected {end}"
            if dtype is not None and stop - begin != _numel(entry["shape"]) * dtype.itemsize:
                return f"tensor {name} has {stop - begin} bytes for shape {entry['shape']} {entry['dtype']}"
            end = stop
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed tensor entry ({err!r})"
    if end != data_bytes:
        state = "truncated" if end > data_bytes else "has trailing bytes"
        return f"file {state}: header describes {end} bytes of tensor data, the file holds {data_bytes}"
    return None


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# ---------------------------------------------------------------------------------------------
# Writing


class HFCheckpointWriter:
    """Streams tensors (HF names) into safetensors shards of at most `max_shard_bytes`; on a clean
    exit writes the index, config.json, generation_config.json and tokenizer files, then renames the
    directory into place. On any error nothing is left behind.

    Tensors wait in memory until their shard is written; a `StoredTensor` (byte ranges of another
    file) waits as a reference and is copied by the kernel when its shard is written, so a
    conversion from such ranges holds no weights at all. `on_written(name, nbytes)` is called as
    each tensor's bytes reach the file.

    Names and shapes are checked against `config` as they arrive, and a missing tensor fails the
    close, so a converter bug cannot produce a checkpoint that loads with random weights."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: LlamaConfig,
        dtype: torch.dtype,
        max_shard_bytes: int = 5 * 2**30,
        force: bool = False,
        tokenizer: str | Path | None = None,
        on_written: Callable[[str, int], None] | None = None,
    ) -> None:
        if not dtype.is_floating_point:
            raise LlamatronError(f"HF checkpoint dtype must be floating point (bf16, fp16, fp32), got {dtype}")
        if max_shard_bytes <= 0:
            raise LlamatronError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.config = config
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.force = force
        self.tokenizer = _check_tokenizer_source(tokenizer)
        self._expected = expected_hf_shapes(config)
        self._written: set[str] = set()
        self.on_written = on_written
        self._scratch = Scratch()  # reused by StoredTensors that pass through memory
        self._pending: dict[str, torch.Tensor | StoredTensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (temporary file name, tensor names, bytes)
        self._context: Any = None
        self._tmp: Path | None = None

    def __enter__(self) -> HFCheckpointWriter:
        self._context = atomic_output_dir(self.out_dir, force=self.force)
        self._tmp = self._context.__enter__()
        return self

    def write(self, name: str, tensor: torch.Tensor | StoredTensor, *, owned: bool = False) -> None:
        """Queue `tensor` for the current shard. owned=True: the caller hands it over and will not
        change it, so no defensive copy is made (converters pass freshly built tensors). A
        StoredTensor is cast to the writer's dtype as it is copied."""
        assert self._tmp is not None, "use HFCheckpointWriter as a context manager"
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            return  # tied: HF stores only the embedding
        if name not in self._expected:
            raise LlamatronError(
                f"unknown tensor name {name!r} for this Llama config; expected HF names such as "
                "model.layers.0.self_attn.q_proj.weight"
            )
        if name in self._written:
            raise LlamatronError(f"tensor {name} was written twice")
        if tuple(tensor.shape) != self._expected[name]:
            raise LlamatronError(
                f"tensor {name} has shape {tuple(tensor.shape)}, the config needs {self._expected[name]}"
            )
        if isinstance(tensor, torch.Tensor):
            converted = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
            if converted.data_ptr() == tensor.data_ptr() and not owned:
                # Held until the shard is written: a copy keeps later in-place edits by the caller out of it.
                converted = converted.clone()
            tensor = converted
        nbytes = math.prod(tensor.shape) * self.dtype.itemsize
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self._written.add(name)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                self._context.__exit__(type(err), err, err.__traceback__)
                raise
        self._context.__exit__(exc_type, exc, tb)

    def _flush(self) -> None:
        assert self._tmp is not None
        file = f"shard-{len(self._shards) + 1:05d}.tmp"
        _write_safetensors(self._tmp / file, self._pending, dtype=self.dtype, on_written=self.on_written,
                           scratch=self._scratch)
        self._shards.append((file, list(self._pending), self._pending_bytes))
        self._pending = {}
        self._pending_bytes = 0

    def _finish(self) -> None:
        assert self._tmp is not None
        missing = [name for name in self._expected if name not in self._written]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise LlamatronError(f"HF checkpoint {self.out_dir} is incomplete: {len(missing)} tensor(s) never written: "
                                 f"{shown}")
        if self._pending:
            self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (tmp_name, names, _) in enumerate(self._shards, 1):
            final = SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            (self._tmp / tmp_name).rename(self._tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            total = sum(nbytes for _, _, nbytes in self._shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(self._tmp / INDEX_FILE, index)
        dtype_name = str(self.dtype).removeprefix("torch.")
        _write_json(self._tmp / "config.json", to_hf_config(self.config, torch_dtype=dtype_name))
        _write_json(self._tmp / "generation_config.json", generation_config(self.config))
        _write_tokenizer(self._tmp, self.tokenizer)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init calls. Only shapes are wanted, and a random init on the meta device runs
    torch's Python reference kernels, whose first use imports torch._dynamo: 2-4 s of a conversion
    on a loaded 2-core machine."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if kwargs and "tensor" in kwargs else args[0]  # init functions return it
        return func(*args, **(kwargs or {}))


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a config (lm_head left out when tied), without allocating weights."""
    with torch.device("meta"), _SkipInit():
        model = Llama(config)
    shapes = {hf_name(name): tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def generation_config(config: LlamaConfig) -> dict[str, Any]:
    """generation_config.json: bos/eos, with all three Llama 3 stop tokens for the Llama 3 vocabulary
    (as Meta's Llama 3.1 files list them) so chat answers end at <|eot_id|>."""
    eos = config.eos_token_id
    if config.vocab_size == LLAMA3_VOCAB_SIZE and config.bos_token_id == LLAMA3_BOS_ID:
        given = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos = [*LLAMA3_STOP_IDS, *(i for i in given if i not in LLAMA3_STOP_IDS)]
    # No "_from_model_config": with it, transformers may rebuild the stop tokens from config.json's
    # single eos and drop <|eot_id|>.
    out: dict[str, Any] = {}
    if config.bos_token_id is not None:
        out["bos_token_id"] = config.bos_token_id
    if eos is not None:
        out["eos_token_id"] = eos
    return out


def _write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor | StoredTensor], *, dtype: torch.dtype,
    on_written: Callable[[str, int], None] | None = None, scratch: Scratch | None = None,
) -> None:
    """Write one safetensors file straight from the tensors' memory or, for StoredTensors (written
    as `dtype`), from their files (no serialised copy in RAM).
    Format: u64 little-endian header length, JSON header padded with spaces to 8 bytes, raw data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        out_dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else dtype
        nbytes = math.prod(tensor.shape) * out_dtype.itemsize
        header[name] = {"dtype": _DTYPE_CODES[out_dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        prefix = struct.pack("<Q", len(encoded)) + encoded
        pwrite_all(fd, prefix, 0)
        for name, tensor in tensors.items():
            begin, end = header[name]["data_offsets"]
            if isinstance(tensor, torch.Tensor):
                pwrite_tensor(fd, tensor, len(prefix) + begin)
            else:
                tensor.write_into(fd, len(prefix) + begin, dtype=dtype, scratch=scratch)
            if on_written is not None:
                on_written(name, end - begin)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _check_tokenizer_source(tokenizer: str | Path | None) -> str | Path | None:
    if tokenizer is None or tokenizer == "llama3":
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LlamatronError(
            f"tokenizer {str(tokenizer)!r} is neither 'llama3' nor a directory with tokenizer files "
            f"({', '.join(TOKENIZER_FILES[:3])}, ...); pass a HF model directory or 'llama3'"
        )
    return path


def _write_tokenizer(out: Path, tokenizer: str | Path | None) -> None:
    if tokenizer is None:
        return
    if tokenizer == "llama3":
        # Imported here: the tokenizer package is optional for reading and writing weights.
        from llamatron.tokenizer.export import export_hf_tokenizer

        export_hf_tokenizer(out)
        return
    for name in TOKENIZER_FILES:
        source = Path(tokenizer) / name
        if source.is_file():
            shutil.copyfile(source, out / name)


# ---------------------------------------------------------------------------------------------
# Whole models


def load_hf_model(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Llama:
    """Build llamatron's model from a HF directory. Strict: every weight must be present with the
    right shape and nothing else may be stored. `dtype` None keeps the stored dtype."""
    with HFCheckpointReader(path) as reader:
        config = reader.config
        model = build_model(config, device=device, dtype=dtype or reader.dtype, seed=None)
        params = model.state_dict()
        wanted = {hf_name(name) for name in params}
        if config.tie_word_embeddings:
            wanted.discard("lm_head.weight")
        stored = [n for n in reader.names() if not n.endswith(IGNORED_SUFFIXES)]
        problems = _load_problems(reader, wanted=wanted, stored=stored, params=params)
        collect_problems(problems, what=f"HF checkpoint {reader.path} does not match its config.json")
        with torch.no_grad():
            for name in _progress(stored, total_bytes=_stored_bytes(reader, stored), what="loading"):
                if name in wanted:  # a tied checkpoint may still carry lm_head.weight: it is the embedding
                    params[internal_name(name)].copy_(reader.get(name))
    model.tie_weights()
    return model


def _load_problems(
    reader: HFCheckpointReader, *, wanted: set[str], stored: list[str], params: dict[str, torch.Tensor]
) -> list[str]:
    problems = []
    tolerated = {"lm_head.weight"} if reader.config.tie_word_embeddings else set()
    missing = sorted(wanted - set(stored))
    extra = sorted(set(stored) - wanted - tolerated)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for name in stored:
        if name in wanted:
            needed = tuple(params[internal_name(name)].shape)
            if reader.shape(name) != needed:
                problems.append(f"{name} has shape {reader.shape(name)}, config.json implies {needed}")
    return problems


def _stored_bytes(reader: HFCheckpointReader, names: list[str]) -> int:
    total = 0
    for name in names:
        dtype = reader.tensor_dtype(name)
        total += _numel(reader.shape(name)) * (dtype.itemsize if dtype is not None else 1)
    return total


def save_hf_model(
    model: Llama,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` as a HF directory (dtype None keeps the model's). Returns the directory."""
    dtype = dtype or next(model.parameters()).dtype
    state = model.state_dict()
    total = sum(t.numel() * dtype.itemsize for t in state.values())
    with HFCheckpointWriter(out_dir, config=model.config, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            force=force, tokenizer=tokenizer) as writer:
        for name in _progress(list(state), total_bytes=total, what="saving"):
            writer.write(hf_name(name), state[name])
    return Path(out_dir)


def _progress(names: list[str], *, total_bytes: int, what: str) -> Iterator[str]:
    """Yield `names`; for checkpoints big enough to take a while, show a progress bar (terminal) or
    log lines with the rate (logs)."""
    if total_bytes < 2**30:
        yield from names
        return
    size = f"{total_bytes / 2**30:.1f} GiB"
    if not sys.stderr.isatty():
        print(f"llamatron: {what} {size} ({len(names)} tensors)", file=sys.stderr)
        start = time.monotonic()
        yield from names
        elapsed = max(time.monotonic() - start, 1e-9)
        print(f"llamatron: {what} done in {elapsed:.0f} s ({total_bytes / 2**30 / elapsed:.2f} GiB/s)",
              file=sys.stderr)
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{what} {size}", total=len(names))
        for name in names:
            yield name
            progress.advance(task)
