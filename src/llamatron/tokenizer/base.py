"""What every llamatron tokenizer offers: the interface data, training, eval and the CLI code against."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """A text <-> id mapping with the special ids LLaMA-style training needs.

    `encode` treats special-token strings in the text as plain text (a document that quotes
    `<|eot_id|>` must not end a turn); `parse_special=True` is for chat templates, whose rendered
    text is made of real control tokens.
    """

    spec: str
    """What to pass to `load_tokenizer` to get this tokenizer again (e.g. in worker processes)."""
    vocab_size: int
    """Number of ids including special tokens (128256 for Llama 3)."""
    bos_id: int | None
    eos_id: int | None
    """End of text: the EOD Megatron appends to every document (128001 for Llama 3)."""
    eot_id: int | None
    """End of a chat turn (`<|eot_id|>` 128009 for Llama 3), None where the vocabulary has none."""
    pad_id: int | None
    stop_ids: tuple[int, ...]
    """Ids that end generation."""

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               parse_special: bool = False) -> list[int]: ...

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, token: str) -> int: ...
