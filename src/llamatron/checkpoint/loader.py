"""One entry point for every model directory a user may hold: `load_model(path)` finds out which format
it is (HF, Megatron-Core of any TP x PP) and returns llamatron's single-device model with its tokenizer.
No conversion step, no files written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llamatron.errors import LlamatronError

if TYPE_CHECKING:
    import torch

    from llamatron.model import Llama
    from llamatron.tokenizer import Tokenizer



def detect_format(path: Path) -> str:
    """"hf", "mcore" or "llamatron" (a training run directory); a clear error for anything else."""
    from llamatron.checkpoint.mcore import is_mcore_checkpoint

    if not path.exists():
        raise LlamatronError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise LlamatronError(f"--model {path} is a file; pass the directory holding the checkpoint")
    has_weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if (path / "config.json").is_file() and has_weights:
        return "hf"
    if is_mcore_checkpoint(path):
        return "mcore"
    from llamatron.checkpoint.dcp import is_run_checkpoint

    if is_run_checkpoint(path):
        return "llamatron"
    present = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise LlamatronError(
        f"{path} is not a model directory of a known format: expected a HF checkpoint (config.json + "
        "*.safetensors), a Megatron-Core checkpoint (latest_checkpointed_iteration.txt, or mp_rank_*/ "
        f"shards) or a llamatron run (checkpoints/latest); found {present}"
    )


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[Llama, Tokenizer]:
    """(model in eval mode, tokenizer). `tokenizer` overrides the checkpoint's own: a HF directory's
    tokenizer files are used by default; for Megatron-Core checkpoints the tokenizer files conversion copied
    beside them, else "llama3" for a Llama 3 vocabulary."""
    from llamatron.tokenizer import load_tokenizer

    path = Path(path).expanduser()
    kind = detect_format(path)
    if kind == "hf":
        from llamatron.checkpoint.hf import load_hf_model

        model = load_hf_model(path, device=device, dtype=dtype)
        if tokenizer is None:
            if not (path / "tokenizer.json").is_file():
                raise LlamatronError(f"{path} has no tokenizer.json; pass --tokenizer llama3 or a HF tokenizer directory")
            tokenizer = path
    elif kind == "mcore":
        from llamatron.checkpoint.mcore import load_mcore_model

        model = load_mcore_model(path, device=device, dtype=dtype)
        if tokenizer is None:
            tokenizer = _mcore_tokenizer(path, vocab_size=model.config.vocab_size)
    else:
        from llamatron.checkpoint.dcp import load_dcp_model

        model, own_tokenizer = load_dcp_model(path, device=device, dtype=dtype)
        if tokenizer is None:
            tokenizer = own_tokenizer
    model.eval()
    return model, load_tokenizer(tokenizer)


def _mcore_tokenizer(path: Path, *, vocab_size: int) -> str | Path:
    """Tokenizer files that `convert hf2mcore` copied beside the tracker (the path may be the root or one
    release/iter_* directory), else Llama 3's when the vocabulary is Llama 3's."""
    from llamatron.checkpoint.convert import default_tokenizer

    for root in (path, path.parent):
        found = default_tokenizer(root, vocab_size=vocab_size)
        if found is not None:
            return found
    raise LlamatronError(f"{path} carries no tokenizer files and its vocabulary ({vocab_size}) is not Llama 3's; "
                         "pass --tokenizer with a HF tokenizer directory")
