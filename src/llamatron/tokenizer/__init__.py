"""Tokenizers: Llama 3 (tiktoken, Meta's ranks) and any HF tokenizer directory, behind one interface.

    tok = load_tokenizer("llama3")          # or load_tokenizer(Path("/ckpt/Meta-Llama-3.1-8B"))
    ids = tok.encode("text", bos=True)

Chat formatting lives in `llamatron.tokenizer.chat`, HF export in `llamatron.tokenizer.export`.
"""

from __future__ import annotations

from pathlib import Path

from llamatron.errors import LlamatronError
from llamatron.tokenizer.base import Tokenizer
from llamatron.tokenizer.hf import HFTokenizer, is_hf_tokenizer_dir
from llamatron.tokenizer.llama3 import ALIASES as LLAMA3_ALIASES
from llamatron.tokenizer.llama3 import Llama3Tokenizer

__all__ = ["HFTokenizer", "Llama3Tokenizer", "Tokenizer", "load_tokenizer"]


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """"llama3" (also "llama3.1", "Llama3Tokenizer") for Meta's Llama 3 tokenizer, or a HF
    tokenizer directory (a HF checkpoint directory works: it holds the tokenizer files)."""
    if isinstance(spec, str) and spec in LLAMA3_ALIASES:
        return Llama3Tokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(sorted(LLAMA3_ALIASES))
        raise LlamatronError(f"tokenizer {str(spec)!r} is neither a known name ({names}) nor an existing "
                             "directory; pass 'llama3' or a HF tokenizer directory")
    if not path.is_dir() or not is_hf_tokenizer_dir(path):
        raise LlamatronError(f"tokenizer directory {path} has no tokenizer.json; expected a HF tokenizer "
                             "directory (tokenizer.json, tokenizer_config.json) or pass 'llama3'")
    return HFTokenizer(path)
