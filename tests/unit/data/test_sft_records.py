"""SFT record parsing: the four formats, detection, and one clear error per kind of bad record."""

from __future__ import annotations

import json

import pytest

from llamatron.data.sft_records import load_records
from llamatron.errors import LlamatronError


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def test_alpaca_with_system_and_history(tmp_path):
    rec = {"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be brief.",
           "history": [["Hi", "Hello!"]]}
    rs = load_records(write_jsonl(tmp_path / "a.jsonl", [rec, {"instruction": "Q", "output": "A"}]))
    assert rs.format == "alpaca" and rs.total == 2
    assert list(rs.records[0].messages) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Translate\n你好"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert list(rs.records[1].messages) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_json_array_messages_sharegpt_and_query(tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    (tmp_path / "m.json").write_text(json.dumps([{"messages": msgs}]))
    rs = load_records(tmp_path / "m.json")
    assert rs.format == "messages" and list(rs.records[0].messages) == msgs
    share = {"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]}
    rs = load_records(write_jsonl(tmp_path / "s.jsonl", [share]))
    assert rs.format == "sharegpt"
    assert list(rs.records[0].messages) == [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    rs = load_records(write_jsonl(tmp_path / "q.jsonl", [{"query": "U", "response": "A"}]))
    assert rs.format == "query" and rs.records[0].messages[-1] == {"role": "assistant", "content": "A"}


def test_ambiguous_formats_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "query": "b", "output": "c", "response": "d"}])
    with pytest.raises(LlamatronError, match=r"line 1 has fields of several formats .*--format"):
        load_records(path)
    assert load_records(path, format="query").records[0].messages[-1]["content"] == "d"
    mixed = write_jsonl(tmp_path / "y.jsonl", [{"instruction": "a", "output": "b"}, {"query": "a", "response": "b"}])
    with pytest.raises(LlamatronError, match=r"records of several formats: alpaca \(line 1\), query \(line 2\)"):
        load_records(mixed)
    with pytest.raises(LlamatronError, match="no record has any of the fields"):
        load_records(write_jsonl(tmp_path / "z.jsonl", [{"text": "a"}]))


@pytest.mark.parametrize(
    ("bad", "message", "reason"),
    [
        ({"instruction": "a"}, "line 2: missing field 'output'", "missing field"),
        ({"instruction": "a", "output": 3}, "line 2: field 'output' must be a string, got int", "non-string content"),
        ({"instruction": "a", "output": "  "}, r"line 2: turn 1 \(assistant\) is empty", "empty output"),
        ('{"instruction": "a", "output": ', "line 2: invalid JSON", "invalid JSON"),
    ],
)
def test_bad_alpaca_record_errors_and_skips(tmp_path, bad, message, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, bad, {"instruction": "q2", "output": "a2"}])
    with pytest.raises(LlamatronError, match=message):
        load_records(path, format="alpaca")
    rs = load_records(path, format="alpaca", on_error="skip")
    assert len(rs.records) == 2 and rs.total == 3 and rs.skipped == {reason: 1}


def test_bad_conversation_records(tmp_path):
    unknown = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "u.jsonl", [unknown])
    with pytest.raises(LlamatronError, match=r"line 1: messages\[0\] has unknown role 'robot'"):
        load_records(path)
    nonstr = {"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(LlamatronError, match=r"line 1: conversations\[0\].value must be a string"):
        load_records(write_jsonl(tmp_path / "n.jsonl", [nonstr]))
    no_answer = {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(LlamatronError, match="must end with an assistant turn"):
        load_records(write_jsonl(tmp_path / "e.jsonl", [no_answer]))
    (tmp_path / "arr.json").write_text('[{"query": "a", "response": "b"}, {"query": "c"}]')
    with pytest.raises(LlamatronError, match="record 1: missing field 'response'"):
        load_records(tmp_path / "arr.json")
    (tmp_path / "broken.json").write_text('[{"query": "a",\n "response": }]')
    with pytest.raises(LlamatronError, match="invalid JSON at line 2"):
        load_records(tmp_path / "broken.json")
