"""Any Hugging Face tokenizer directory (tokenizer.json) through the `tokenizers` library.

Special ids come from tokenizer_config.json, then special_tokens_map.json, then
generation_config.json, whichever has them. Chat templates are rendered by transformers' own
renderer, so the text is exactly what `AutoTokenizer.apply_chat_template` would produce.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from llamatron.errors import LlamatronError

TOKENIZER_FILE = "tokenizer.json"
# Tokens that end a chat turn in common vocabularies (Llama 3, ChatML/SmolLM2/Qwen, Gemma).
TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
# Tokens that end a document in pretraining data (Llama 3, GPT-2 style).
TEXT_END_TOKENS = ("<|end_of_text|>", "<|endoftext|>")
# The special-token names a chat template may refer to, as transformers passes them.
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                        "mask_token")


def is_hf_tokenizer_dir(path: Path) -> bool:
    return (path / TOKENIZER_FILE).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LlamatronError(f"{path} is not valid JSON ({e}); fix or delete the file") from None


def _token_text(value: Any) -> str | None:
    # Older files store special tokens as AddedToken dicts rather than strings.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


class HFTokenizer:
    """A HF tokenizer directory. See `llamatron.tokenizer.base.Tokenizer` for the interface."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path).resolve()
        if not is_hf_tokenizer_dir(self.path):
            raise LlamatronError(f"{self.path} has no {TOKENIZER_FILE}; pass a HF tokenizer directory "
                                 "(with tokenizer.json and tokenizer_config.json) or 'llama3'")
        self.spec = str(self.path)
        self.config = _read_json(self.path / "tokenizer_config.json")
        special_map = _read_json(self.path / "special_tokens_map.json")
        generation = _read_json(self.path / "generation_config.json")

        # `model` encodes special-token strings as text; `chat_model` (below) parses them. Two
        # objects rather than toggling one, so concurrent encode calls cannot see each other's mode.
        self.model = RustTokenizer.from_file(str(self.path / TOKENIZER_FILE))
        self.model.encode_special_tokens = True
        self.vocab_size = self.model.get_vocab_size(with_added_tokens=True)

        self.special_tokens: dict[str, str] = {}
        for name in TEMPLATE_TOKEN_NAMES:
            text = _token_text(self.config.get(name)) or _token_text(special_map.get(name))
            if text is not None:
                self.special_tokens[name] = text
        ids = {name: self.model.token_to_id(text) for name, text in self.special_tokens.items()}

        self.bos_id = ids.get("bos_token")
        if self.bos_id is None:
            self.bos_id = _first_id(generation.get("bos_token_id"))
        declared_eos = ids.get("eos_token")
        if declared_eos is None:
            declared_eos = _first_id(generation.get("eos_token_id"))
        self.eot_id = self._first_present(TURN_END_TOKENS)
        text_end = self._first_present(TEXT_END_TOKENS)
        # Instruct releases declare the turn end as eos (Llama 3.1 Instruct: <|eot_id|>, SmolLM2:
        # <|im_end|>), but documents in pretraining data end with the end-of-text token.
        self.eos_id = text_end if declared_eos == self.eot_id and text_end is not None else declared_eos
        self.pad_id = ids.get("pad_token")
        if self.pad_id is None:
            self.pad_id = self.model.token_to_id("<|finetune_right_pad_id|>")
        if self.pad_id is None:
            self.pad_id = _first_id(generation.get("pad_token_id"))

        stops = [self.eos_id, declared_eos, self.eot_id, self.model.token_to_id("<|eom_id|>")]
        generation_eos = generation.get("eos_token_id")
        stops += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if isinstance(i, int)))

    def __reduce__(self):
        return (HFTokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size})"

    @cached_property
    def chat_model(self):
        from tokenizers import Tokenizer as RustTokenizer

        return RustTokenizer.from_file(str(self.path / TOKENIZER_FILE))

    @cached_property
    def chat_template(self) -> str | None:
        """The jinja chat template: chat_template.jinja, else tokenizer_config.json's (the "default"
        one when it holds several named templates)."""
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               parse_special: bool = False) -> list[int]:
        model = self.chat_model if parse_special else self.model
        return self._wrap(model.encode(text, add_special_tokens=False).ids, bos=bos, eos=eos)

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        encodings = self.model.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos=bos, eos=eos) for e in encodings]

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The special (control) token strings, longest first so a token wins over its prefixes."""
        added = self.model.get_added_tokens_decoder().values()
        return tuple(sorted((t.content for t in added if t.special), key=len, reverse=True))

    def encode_with_offsets(self, text: str, *, parse_special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each token's (start, end) in characters of `text`."""
        model = self.chat_model if parse_special else self.model
        encoding = model.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self.model.token_to_id(token)
        if token_id is None:
            raise LlamatronError(f"{token!r} is not in the vocabulary of {self.path}")
        return token_id

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat as text, rendered exactly like transformers' apply_chat_template(tokenize=False)."""
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise LlamatronError(
                "rendering a HF chat template needs transformers.utils.chat_template_utils."
                "render_jinja_template; upgrade with `pip install -U transformers`") from None
        if self.chat_template is None:
            raise LlamatronError(f"{self.path} has no chat template (no chat_template.jinja and no "
                                 "chat_template in tokenizer_config.json); add one or use 'llama3'")
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs},
        )
        return rendered[0]

    def _first_present(self, tokens: tuple[str, ...]) -> int | None:
        for token in tokens:
            token_id = self.model.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def _wrap(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise LlamatronError(f"{self.path} defines no bos token; encode without bos")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise LlamatronError(f"{self.path} defines no eos token; encode without eos")
            ids = [*ids, self.eos_id]
        return ids
