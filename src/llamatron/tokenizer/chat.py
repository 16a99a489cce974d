"""Chat dialogs to token ids, with the token span of every message so loss masks can be built.

Llama 3 tokenizers use the Llama 3.1 format, token for token what Meta's
`llama_models.llama3.chat_format.ChatFormat.encode_dialog_prompt` produces:

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>     (per message)
    <|start_header_id|>assistant<|end_header_id|>\n\n                             (generation prompt)

Each part is encoded on its own and the ids concatenated, as Meta does, so message text never
merges with the header and special-token strings inside content stay plain text. Content is
stripped like the official HF template's `| trim` (Meta's reference leaves it as given).

Other HF tokenizers render their own chat template (exactly as transformers does) and tokenize
the text as `apply_chat_template(..., sanitize_control_tokens=True)` does: control tokens the
template writes are parsed, while control-token strings inside message content stay plain text
(as in the Llama 3 path). Message spans are then found by rendering prefixes: message i spans the
characters between render(messages[:i]) and render(messages[:i+1]), which must each be a prefix of
the full rendering, and a token belongs to the message its first character falls in.

Build an SFT loss mask from the result with:
    for s in enc.segments: if s.role == "assistant": mask[s.start:s.end] = True
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field

from llamatron.errors import LlamatronError
from llamatron.tokenizer.base import Tokenizer
from llamatron.tokenizer.hf import HFTokenizer
from llamatron.tokenizer.llama3 import Llama3Tokenizer

# The system block Llama 3.1 Instruct was tuned with; the seed's fallback adds it when a dialog
# has no system message of its own.
DEFAULT_SYSTEM_PROMPT = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
# Message role -> the role written in the Llama 3.1 header (Meta writes tool results as ipython).
LLAMA3_HEADER_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
                       "ipython": "ipython", "tool": "ipython"}
LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Private-use characters that wrap control-token strings found in message content while the
# template renders, so they can be told apart from the control tokens the template writes.
MARK_START, MARK_END = "\ue000", "\ue001"


@dataclass(frozen=True)
class ChatSegment:
    role: str
    start: int
    """First token of the message (its header included)."""
    end: int
    """One past its last token (its end-of-turn token and any separator after it included)."""


@dataclass(kw_only=True)
class ChatEncoding:
    ids: list[int]
    segments: list[ChatSegment] = field(default_factory=list)
    """One per message, in order; the begin-of-text token and a generation prompt are in none."""


def encode_chat(tok: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                bos: bool = True, default_system: bool = False) -> ChatEncoding:
    """Token ids of a dialog of {"role", "content"} messages, and where each message lies in them.

    bos: start with the begin-of-text token (a HF template's leading bos is dropped if False).
    default_system: insert Llama 3.1's date system message when the dialog has no system message.
    """
    messages = _validated(messages)
    if default_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]
    if _uses_llama3_format(tok):
        return _encode_llama3(tok, messages, add_generation_prompt=add_generation_prompt, bos=bos)
    if isinstance(tok, HFTokenizer):
        return _encode_template(tok, messages, add_generation_prompt=add_generation_prompt, bos=bos)
    raise LlamatronError(f"{tok!r} has neither the Llama 3 chat tokens nor a chat template")


def _validated(messages: list[dict]) -> list[dict]:
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            problems.append(f"message {i} must be a dict with a string 'content', got {message!r}")
        elif message.get("role") not in LLAMA3_HEADER_ROLES:
            problems.append(f"message {i} has role {message.get('role')!r}; "
                            f"use one of {', '.join(LLAMA3_HEADER_ROLES)}")
    if problems:
        raise LlamatronError("chat messages: " + "; ".join(problems))
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _uses_llama3_format(tok: Tokenizer) -> bool:
    if isinstance(tok, Llama3Tokenizer):
        return True
    # A HF directory with the Llama 3 vocabulary but no template of its own still speaks 3.1.
    return (isinstance(tok, HFTokenizer) and tok.chat_template is None
            and all(tok.model.token_to_id(t) is not None for t in LLAMA3_HEADER_TOKENS))


def _encode_llama3(tok: Tokenizer, messages: list[dict], *, add_generation_prompt: bool,
                   bos: bool) -> ChatEncoding:
    start_header, end_header, eot = (tok.token_id(t) for t in LLAMA3_HEADER_TOKENS)
    blank_line = tok.encode("\n\n")

    def header(role: str) -> list[int]:
        return [start_header, *tok.encode(LLAMA3_HEADER_ROLES[role]), end_header, *blank_line]

    ids = [tok.token_id("<|begin_of_text|>")] if bos else []
    segments = []
    for message in messages:
        start = len(ids)
        ids += header(message["role"]) + tok.encode(message["content"].strip()) + [eot]
        segments.append(ChatSegment(role=message["role"], start=start, end=len(ids)))
    if add_generation_prompt:
        ids += header("assistant")
    return ChatEncoding(ids=ids, segments=segments)


def _encode_template(tok: HFTokenizer, messages: list[dict], *, add_generation_prompt: bool,
                     bos: bool) -> ChatEncoding:
    control = re.compile("|".join(map(re.escape, tok.control_tokens)) or "(?!)")  # (?!): none
    messages = [{**m, "content": _mark(m["content"], control)} for m in messages]
    text = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    ids, starts = _encode_marked(tok, text)

    boundaries = [_empty_render_length(tok, text)]
    for i in range(1, len(messages) + 1):
        prefix = tok.render_chat(messages[:i])
        if not text.startswith(prefix):
            raise LlamatronError(
                f"the chat template of {tok.path} renders message {i - 1} differently once later "
                "messages follow, so message spans cannot be found; use a template that renders "
                "each turn independently (e.g. export one with `llamatron.tokenizer.export`)")
        boundaries.append(len(prefix))
    token_at = [bisect_left(starts, c) for c in boundaries]
    segments = [ChatSegment(role=m["role"], start=token_at[i], end=token_at[i + 1])
                for i, m in enumerate(messages)]

    if not bos and ids and ids[0] == tok.bos_id:
        ids = ids[1:]
        segments = [ChatSegment(role=s.role, start=max(s.start - 1, 0), end=s.end - 1) for s in segments]
    return ChatEncoding(ids=ids, segments=segments)


def _mark(content: str, control: re.Pattern) -> str:
    content = content.replace(MARK_START, "").replace(MARK_END, "")  # no forged marks
    return control.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", content)


def _encode_marked(tok: HFTokenizer, text: str) -> tuple[list[int], list[int]]:
    """Ids of rendered text whose marked control-token strings are plain text, and the position
    in `text` where each token starts (non-decreasing, for mapping message boundaries)."""
    ids: list[int] = []
    starts: list[int] = []

    def add(piece_start: int, piece_end: int, *, parse_special: bool) -> None:
        piece = text[piece_start:piece_end]
        if parse_special:
            # A template that cut a marked string apart leaves lone marks; drop them.
            piece = piece.replace(MARK_START, "").replace(MARK_END, "")
        if piece:
            piece_ids, offsets = tok.encode_with_offsets(piece, parse_special=parse_special)
            ids.extend(piece_ids)
            starts.extend(min(piece_start + start, piece_end) for start, _ in offsets)

    at = 0
    for marked in re.finditer(f"{MARK_START}([^{MARK_END}]*){MARK_END}", text):
        add(at, marked.start(), parse_special=True)
        add(marked.start(1), marked.end(1), parse_special=False)
        at = marked.end()
    add(at, len(text), parse_special=True)
    return ids, starts


def _empty_render_length(tok: HFTokenizer, text: str) -> int:
    """Characters a template writes before any message (e.g. a bos token); 0 for templates that
    cannot render an empty dialog (those indexing messages[0]), whose preamble then goes to the
    first message."""
    try:
        empty = tok.render_chat([])
    except Exception:  # any template error: jinja raises several unrelated types here
        return 0
    return len(empty) if text.startswith(empty) else 0
