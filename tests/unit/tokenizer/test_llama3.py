"""The Llama 3 tokenizer against Meta's reference (llama-models) and the exported HF files against
both (loaded by transformers and by our adapter). Ids must be equal, not close."""

from __future__ import annotations

import pickle

import pytest

from llamatron.errors import LlamatronError
from llamatron.tokenizer import HFTokenizer, Llama3Tokenizer, load_tokenizer

LONG_DOCUMENT = "\n\n".join(
    f"Section {i}. The quick brown fox jumps over the lazy dog; 快速的棕色狐狸跳过了懒狗。 x_{i} = {i * 7919}"
    for i in range(400)
)
CORPUS = [
    "",
    "Hello world!",
    "The Llama 3.1 herd of models, released July 23rd 2024, supports 8 languages.",
    "I'm sure they'll say we've done it, DON'T YOU'D THINK?",
    "中文测试：你好，世界！机器学习和自然语言处理。",
    "混合 mixed 文本 with English, 数字 42 和标点。",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }  // C++",
    "1234567890 3.14159265358979 0000007 12,345,678.90 -42 1e-5",
    "9" * 1000,
    "a" + " " * 500 + "b",
    "\t\ttabs\tand\nnew\r\nlines\n\n\n   \n \t \n",
    "   leading and trailing whitespace   ",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇨🇳 and symbols ©®™ ∑∫√ ← ↑",
    "Ünïcödé ñ ß ø åccents; Ελληνικά; русский текст; العربية; हिन्दी; 日本語のテキスト",
    "<|begin_of_text|><|eot_id|> written as text <|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_200|> <|finetune_right_pad_id|>",
    "\u200b zero width \u00a0 nbsp \u3000 ideographic space",
    LONG_DOCUMENT,
]
NAMED_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
             "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
             "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|image|>": 128011,
             "<|reserved_special_token_245|>": 128255}


def test_special_ids(llama3, meta):
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.eot_id) == (128000, 128001, 128004, 128009)
    assert set(llama3.stop_ids) == {128001, 128008, 128009}
    assert llama3.special_tokens == meta.special_tokens
    for name, token_id in NAMED_IDS.items():
        assert llama3.token_id(name) == token_id
    with pytest.raises(LlamatronError, match="not a Llama 3 special token"):
        llama3.token_id("<|nope|>")


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_ids_equal_meta_and_exported_hf(index, llama3, meta, exported_auto, exported_hf):
    text = CORPUS[index]
    expected = meta.encode(text, bos=False, eos=False)  # special-token strings as text, like ours
    assert llama3.encode(text) == expected
    assert exported_hf.encode(text) == expected
    assert exported_auto.encode(text, add_special_tokens=False, split_special_tokens=True) == expected
    assert llama3.decode(expected) == text
    assert exported_hf.decode(expected) == text
    assert exported_auto.decode(expected) == text


def test_batch_bos_eos_and_parse_special(llama3, meta, exported_auto, exported_hf):
    batch = llama3.encode_batch(CORPUS, bos=True, eos=True)
    assert batch == [meta.encode(t, bos=True, eos=True) for t in CORPUS]
    assert exported_hf.encode_batch(CORPUS, bos=True, eos=True) == batch
    # transformers' default call prepends bos through the exported post-processor, as the official files do.
    assert exported_auto("Hello world")["input_ids"] == meta.encode("Hello world", bos=True, eos=False)
    text = "a<|eot_id|>b<|start_header_id|>"
    expected = meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert expected.count(128009) == 1
    assert llama3.encode(text, parse_special=True) == expected
    assert exported_hf.encode(text, parse_special=True) == expected


def test_huge_documents_split_like_meta(llama3, meta):
    # Runs past 25k chars and a document past 400k chars crash tiktoken unless split; Meta's
    # reference splits at fixed places, and ours must split at the same ones.
    huge = [" " * 60_000 + "end", "x" * 70_000, "ab " * 150_000 + "\n" * 30_000 + "é" * 26_000]
    for text in huge:
        expected = meta.encode(text, bos=False, eos=False)
        assert llama3.encode(text) == expected
        assert llama3.decode(expected) == text
    assert llama3.encode_batch(huge) == [meta.encode(t, bos=False, eos=False) for t in huge]


def test_exported_hf_special_ids(exported_hf, exported_auto):
    assert exported_hf.vocab_size == len(exported_auto) == 128256
    assert (exported_hf.bos_id, exported_hf.eos_id, exported_hf.pad_id, exported_hf.eot_id) == (
        128000, 128001, 128004, 128009)
    assert exported_auto.bos_token_id == 128000 and exported_auto.eos_token_id == 128001
    for name, token_id in NAMED_IDS.items():
        assert exported_hf.token_id(name) == token_id
        assert exported_auto.convert_tokens_to_ids(name) == token_id


def test_pickle_reloads(llama3, exported_hf):
    again = pickle.loads(pickle.dumps(llama3))
    assert isinstance(again, Llama3Tokenizer) and again.encode("pickled 中文") == llama3.encode("pickled 中文")
    hf_again = pickle.loads(pickle.dumps(exported_hf))
    assert isinstance(hf_again, HFTokenizer) and hf_again.spec == exported_hf.spec
    assert load_tokenizer(llama3.spec).vocab_size == 128256


@pytest.mark.parametrize("alias", ["llama3", "llama3.1", "Llama3Tokenizer"])
def test_aliases(alias):
    assert isinstance(load_tokenizer(alias), Llama3Tokenizer)


def test_bad_specs(tmp_path):
    with pytest.raises(LlamatronError, match="nope-tokenizer.*neither a known name"):
        load_tokenizer("nope-tokenizer")
    missing = tmp_path / "missing"
    with pytest.raises(LlamatronError, match="missing"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlamatronError, match="empty has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LlamatronError, match="file.txt has no tokenizer.json"):
        load_tokenizer(tmp_path / "file.txt")
