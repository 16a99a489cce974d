"""Option parsing shared by subcommands: dtype and device names as users type them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llamatron.errors import LlamatronError

if TYPE_CHECKING:
    import torch

DTYPE_HELP = "bf16, fp16, fp32, or auto (the checkpoint's own dtype)."
_DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def parse_dtype(name: str) -> torch.dtype | None:
    """A torch dtype from a user's spelling; None for "auto"."""
    import torch

    if name == "auto":
        return None
    if name.lower() not in _DTYPES:
        raise LlamatronError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32, auto")
    return getattr(torch, _DTYPES[name.lower()])


def pick_device(name: str) -> torch.device:
    """"auto" takes the first GPU when one is visible, else the CPU; an unavailable GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LlamatronError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlamatronError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device
