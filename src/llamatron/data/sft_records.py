"""SFT records from JSON or JSONL files, turned into chat messages (role/content dicts).

Four record formats:
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[query, response], ...]}
            the user turn is the instruction, then a newline and the input when the input is non-empty
            (Pai-Megatron-Patch joins the two without a separator; Alpaca and LLaMA-Factory use "\\n").
- query:    {"query", "response", "system"?, "history"?}
- messages: {"messages": [{"role": "system"|"user"|"assistant"|"ipython", "content": str}, ...]}
- sharegpt: {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant"|"observation", "value": str}]}

A file is either one JSON array of records or one record per line (JSONL). The format is detected
from the fields of the records unless given; records of two formats (or one record with fields of two)
are refused as ambiguous. A bad record raises a LlamatronError naming it ("line 7" for JSONL, "record 6"
for an array, 0-based); with on_error="skip" it is counted by reason instead.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatron.errors import LlamatronError

FORMATS = ("alpaca", "query", "messages", "sharegpt")
# The field whose presence identifies each format.
FORMAT_KEYS = {"alpaca": "instruction", "query": "query", "messages": "messages", "sharegpt": "conversations"}
CHAT_ROLES = ("system", "user", "assistant", "ipython")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "observation": "ipython",
}
# Records looked at to detect the format: enough to catch a mixed file early, cheap on huge ones.
DETECT_RECORDS = 1000


class RecordError(ValueError):
    """One bad record; `reason` is the short category counted when records are skipped."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(kw_only=True, frozen=True)
class SFTRecord:
    index: int
    """0-based position of the record in the file."""
    where: str
    """How an error message names the record: "line 12" (JSONL, 1-based) or "record 11" (array, 0-based)."""
    messages: tuple[dict[str, str], ...]
    """The conversation, ending with an assistant turn."""


@dataclass(kw_only=True)
class RecordSet:
    records: list[SFTRecord]
    format: str
    total: int
    """Records in the file, bad ones included."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad records skipped (on_error="skip"), by reason."""


def load_records(path: str | Path, *, format: str = "auto", on_error: str = "raise") -> RecordSet:
    """Read every record of a JSON array or JSONL file as a conversation."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise LlamatronError(f"unknown SFT record format {format!r}; choose auto or one of {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise LlamatronError(f"unknown on_error {on_error!r}; choose raise or skip")
    if not path.is_file():
        raise LlamatronError(f"SFT input {path} does not exist; pass a .json or .jsonl file")
    raw = _read_raw(path, on_error=on_error)
    skipped: Counter[str] = Counter(reason for _, _, reason in raw if reason is not None)
    objects = [(where, obj) for where, obj, reason in raw if reason is None]
    if format == "auto":
        format = detect_format(objects, path=path)
    records = []
    for index, (where, obj) in enumerate(objects):
        try:
            messages = record_messages(obj, format=format)
        except RecordError as err:
            if on_error == "raise":
                raise LlamatronError(f"{path}: {where}: {err} (or pass --on-error skip)") from None
            skipped[err.reason] += 1
            continue
        records.append(SFTRecord(index=index, where=where, messages=tuple(messages)))
    return RecordSet(records=records, format=format, total=len(raw), skipped=dict(skipped))


def _read_raw(path: Path, *, on_error: str) -> list[tuple[str, Any, str | None]]:
    """(where, parsed object or None, reason it is bad or None) for each record of the file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            # A broken array cannot be split into records, so even on_error=skip stops here.
            raise LlamatronError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        return [(f"record {i}", obj, None) for i, obj in enumerate(array)]
    out: list[tuple[str, Any, str | None]] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {line_no}"
        try:
            out.append((where, json.loads(line), None))
        except json.JSONDecodeError as err:
            if on_error == "raise":
                raise LlamatronError(
                    f"{path}: {where}: invalid JSON at column {err.colno}: {err.msg} (or pass --on-error skip)"
                ) from None
            out.append((where, None, "invalid JSON"))
    return out


def detect_format(objects: list[tuple[str, Any]], *, path: Path | str = "input") -> str:
    """The one format whose identifying field the records carry; refuses none and several."""
    seen: dict[str, str] = {}  # format -> first record that has it
    for where, obj in objects[:DETECT_RECORDS]:
        if not isinstance(obj, dict):
            continue
        found = [name for name, key in FORMAT_KEYS.items() if key in obj]
        if len(found) > 1:
            keys = ", ".join(FORMAT_KEYS[name] for name in found)
            raise LlamatronError(
                f"{path}: {where} has fields of several formats ({keys}); pass --format {'|'.join(found)}"
            )
        if found:
            seen.setdefault(found[0], where)
    if len(seen) > 1:
        listing = ", ".join(f"{name} ({where})" for name, where in seen.items())
        raise LlamatronError(f"{path}: records of several formats: {listing}; pass --format to choose one")
    if not seen:
        first = next((obj for _, obj in objects if isinstance(obj, dict)), None)
        found = sorted(first) if first else []
        raise LlamatronError(
            f"{path}: no record has any of the fields {', '.join(FORMAT_KEYS.values())} (found: "
            f"{', '.join(found) or 'none'}); fix the data or pass --format"
        )
    return next(iter(seen))


def record_messages(obj: Any, *, format: str) -> list[dict[str, str]]:
    """One record as a conversation ending with an assistant turn; RecordError if it is malformed."""
    if not isinstance(obj, dict):
        raise RecordError("not an object", f"expected a JSON object, got {type(obj).__name__}")
    if format == "alpaca":
        instruction = _string(obj, "instruction")
        extra = _string(obj, "input", required=False)
        user = f"{instruction}\n{extra}" if extra else instruction
        messages = _prompt_response(obj, user=user, response_key="output")
    elif format == "query":
        messages = _prompt_response(obj, user=_string(obj, "query"), response_key="response")
    elif format == "messages":
        messages = _turns(obj, key="messages", role_key="role", content_key="content", roles=None)
    elif format == "sharegpt":
        messages = _turns(obj, key="conversations", role_key="from", content_key="value", roles=SHAREGPT_ROLES)
    else:
        raise AssertionError(format)
    _check_conversation(messages)
    return messages


def _string(obj: dict, key: str, *, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError("missing field", f"missing field {key!r} (fields: {', '.join(sorted(obj)) or 'none'})")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("non-string content", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _prompt_response(obj: dict, *, user: str, response_key: str) -> list[dict[str, str]]:
    messages = []
    system = _string(obj, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("bad history", f"field 'history' must be a list of [query, response] pairs, got {history!r}")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError("bad history", f"history[{turn}] must be a [query, response] pair, got {pair!r}")
        if not all(isinstance(text, str) for text in pair):
            raise RecordError("non-string content", f"history[{turn}] must hold two strings, got {pair!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _string(obj, response_key)})
    return messages


def _turns(obj: dict, *, key: str, role_key: str, content_key: str, roles: dict[str, str] | None) -> list[dict]:
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordError("missing field", f"field {key!r} must be a non-empty list of turns, got {turns!r}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise RecordError("missing field", f"{key}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role, content = turn[role_key], turn[content_key]
        allowed = list(roles) if roles is not None else list(CHAT_ROLES)
        if role not in allowed:
            raise RecordError("unknown role", f"{key}[{i}] has unknown role {role!r}; expected one of {', '.join(allowed)}")
        if not isinstance(content, str):
            raise RecordError("non-string content", f"{key}[{i}].{content_key} must be a string, got {type(content).__name__}")
        messages.append({"role": roles[role] if roles is not None else role, "content": content})
    return messages


def _check_conversation(messages: list[dict[str, str]]) -> None:
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise RecordError("misplaced system", f"turn {i} is a system message; only the first turn may be one")
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError("empty output", f"turn {i} (assistant) is empty; there is nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            "no final answer", f"the last turn is {messages[-1]['role']!r}; a conversation must end with an assistant turn"
        )
