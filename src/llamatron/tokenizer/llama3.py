"""The Llama 3 tokenizer: Meta's BPE ranks (from the `llama-models` wheel) through tiktoken.

Same ranks, pre-tokenisation pattern and 256 special tokens as Meta's `llama_models.llama3.tokenizer`,
so ids match the released checkpoints. The ranks file is located without importing `llama_models`,
whose package init pulls in heavy dependencies we never use.
"""

from __future__ import annotations

import base64
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

from llamatron.errors import LlamatronError

SPEC = "llama3"
ALIASES = frozenset({"llama3", "llama3.1", "Llama3Tokenizer"})

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)

# tiktoken's regex engine overflows its stack (a Rust panic, not an exception) on very long inputs
# and on very long runs of whitespace or non-whitespace (openai/tiktoken#195). Meta's reference
# encodes 400k-char windows and cuts runs longer than 25k chars; we cut at the same places so
# ids stay identical to it even on such documents.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def special_token_names() -> list[str]:
    """All 256 special tokens in id order (the first gets id 128000)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>"
                for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))]
    return [*NAMED_SPECIAL_TOKENS, *reserved]


def ranks_path() -> Path:
    """Meta's `tokenizer.model` (base64 token, rank per line) inside the installed llama-models."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise LlamatronError("the llama3 tokenizer needs the llama-models package; "
                             "install it with `pip install llama-models`")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise LlamatronError(f"{path} is missing from the llama-models package; "
                             "reinstall it with `pip install --force-reinstall llama-models`")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Pieces of `text` that tiktoken can encode safely, cut exactly where Meta's reference cuts:
    400k-char windows, then within each window every run of whitespace or non-whitespace is cut
    every 25k chars (runs restart at a window's start)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start:start + MAX_ENCODE_CHARS]
        if len(window) <= MAX_RUN_CHARS:  # no run can be too long; the common case
            yield window
            continue
        piece_start = 0
        for run in _RUNS.finditer(window):
            # `\s` is str.isspace() for str patterns, the test Meta's splitter uses.
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield window[piece_start:cut]
                piece_start = cut
        yield window[piece_start:]


class Llama3Tokenizer:
    """Llama 3 / 3.1 / 3.2 tokenizer (vocab 128256). See `llamatron.tokenizer.base.Tokenizer`."""

    def __init__(self, path: Path | None = None) -> None:
        import tiktoken

        path = path or ranks_path()
        ranks = load_ranks(path)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(name="llama3", pat_str=PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.spec = SPEC if path == ranks_path() else str(path)
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)

    def __reduce__(self):
        # Pickle as "load it again": worker processes rebuild it instead of copying 128k ranks.
        return (Llama3Tokenizer, () if self.spec == SPEC else (Path(self.spec),))

    def __repr__(self) -> str:
        return f"Llama3Tokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               parse_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token strings are plain text unless `parse_special` (chat
        templates); a huge document is encoded in pieces so tiktoken never crashes on it."""
        if parse_special:
            def encode_piece(piece: str) -> list[int]:
                return self.model.encode(piece, allowed_special="all")
        else:
            encode_piece = self.model.encode_ordinary
        pieces = list(split_for_tiktoken(text))
        if len(pieces) == 1:
            return self._wrap(encode_piece(pieces[0]), bos=bos, eos=eos)
        return self._wrap([i for piece in pieces for i in encode_piece(piece)], bos=bos, eos=eos)

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        """Ids of many texts at once; tiktoken encodes them on `num_threads` threads (the GIL is
        released), which is what makes preprocessing fast."""
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            before = len(pieces)
            pieces.extend(split_for_tiktoken(text))
            counts.append(len(pieces) - before)
        encoded = self.model.encode_ordinary_batch(pieces, num_threads=num_threads)
        out, at = [], 0
        for count in counts:
            ids = encoded[at] if count == 1 else [i for part in encoded[at:at + count] for i in part]
            out.append(self._wrap(ids, bos=bos, eos=eos))
            at += count
        return out

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))

    def token_id(self, token: str) -> int:
        """Id of a special token such as `<|eot_id|>`."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise LlamatronError(f"{token!r} is not a Llama 3 special token; "
                                 "use one like '<|eot_id|>' or '<|reserved_special_token_5|>'") from None

    def _wrap(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids
