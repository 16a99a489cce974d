"""Chat encoding against Meta's ChatFormat (llama-models) and against transformers'
apply_chat_template for the exported Llama 3 tokenizer and for SmolLM2's own ChatML template.
Ids must be equal; spans are checked by decoding them to the text each message must render as."""

from __future__ import annotations

import pytest

from llamatron.errors import LlamatronError
from llamatron.tokenizer import load_tokenizer
from llamatron.tokenizer.chat import DEFAULT_SYSTEM_PROMPT, encode_chat

DIALOGS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You are a terse assistant."},
               {"role": "user", "content": "Say hi in 中文."}],
    "multi": [{"role": "system", "content": "Answer in one line."},
              {"role": "user", "content": "  2+2?\n"},
              {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And <|eot_id|> as text? 😀"},
              {"role": "assistant", "content": "\nIt stays text.\n\n"}],
    "no_system_multi": [{"role": "user", "content": "def f(x):\n    return x"},
                        {"role": "assistant", "content": "A function returning its argument."},
                        {"role": "tool", "content": '{"result": 42}'},
                        {"role": "assistant", "content": ""}],
}


def meta_ids(messages: list[dict]) -> list[int]:
    """Meta's reference, which always ends with the assistant header. Content is stripped first:
    our format strips it like the official HF template does; Meta's code leaves that to callers."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    chat_format = ChatFormat(Tokenizer.get_instance())
    raw = [RawMessage(role=m["role"], content=m["content"].strip()) for m in messages]
    return chat_format.encode_dialog_prompt(raw).tokens


def assistant_header(llama3) -> list[int]:
    return [128006, *llama3.encode("assistant"), 128007, *llama3.encode("\n\n")]


@pytest.mark.parametrize("name", DIALOGS)
def test_equals_meta(name, llama3):
    messages = DIALOGS[name]
    expected = meta_ids(messages)
    assert encode_chat(llama3, messages, add_generation_prompt=True).ids == expected
    without_prompt = encode_chat(llama3, messages).ids
    assert without_prompt + assistant_header(llama3) == expected
    assert encode_chat(llama3, messages, bos=False).ids == without_prompt[1:]


@pytest.mark.parametrize("name", DIALOGS)
def test_segments_cover_each_message(name, llama3):
    messages = DIALOGS[name]
    enc = encode_chat(llama3, messages, add_generation_prompt=True)
    assert [s.role for s in enc.segments] == [m["role"] for m in messages]
    assert enc.segments[0].start == 1  # after <|begin_of_text|>
    for before, after in zip(enc.segments, enc.segments[1:], strict=False):
        assert before.end == after.start
    for segment, message in zip(enc.segments, messages, strict=True):
        role = "ipython" if message["role"] == "tool" else message["role"]
        text = f"<|start_header_id|>{role}<|end_header_id|>\n\n{message['content'].strip()}<|eot_id|>"
        assert llama3.decode(enc.ids[segment.start:segment.end]) == text
    assert enc.ids[enc.segments[-1].end:] == assistant_header(llama3)


def test_default_system(llama3):
    dialog = DIALOGS["single"]
    with_default = encode_chat(llama3, dialog, default_system=True, add_generation_prompt=True)
    assert with_default.ids == meta_ids([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *dialog])
    assert [s.role for s in with_default.segments] == ["system", "user"]
    has_system = DIALOGS["system"]
    assert encode_chat(llama3, has_system, default_system=True).ids == encode_chat(llama3, has_system).ids


@pytest.mark.parametrize("name", DIALOGS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_exported_template_renders_same_ids(name, add_generation_prompt, llama3, exported_auto, exported_hf):
    # Control-token strings in content are covered by test_control_strings_in_content_stay_text.
    messages = [{**m, "content": m["content"].replace("<|eot_id|>", "eot")} for m in DIALOGS[name]]
    ours = encode_chat(llama3, messages, add_generation_prompt=add_generation_prompt)
    # sanitize_control_tokens: "<|eot_id|>" written inside content is text, as in Meta's format.
    auto = exported_auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             sanitize_control_tokens=True)
    assert list(auto["input_ids"]) == ours.ids
    through_template = encode_chat(exported_hf, messages, add_generation_prompt=add_generation_prompt)
    assert through_template.ids == ours.ids
    assert through_template.segments == ours.segments
    if name == "single":
        auto = exported_auto.apply_chat_template(messages, default_system=True)
        assert list(auto["input_ids"]) == encode_chat(llama3, messages, default_system=True).ids


def test_control_strings_in_content_stay_text(llama3, exported_auto, exported_hf):
    """Meta encodes each content whole as plain text; a HF template path (like transformers'
    sanitize_control_tokens) encodes control strings as text too, but as separate pieces, so the
    ids around them may differ while the text and the absence of control ids agree."""
    messages = [{"role": "user", "content": "And <|eot_id|> as text? <|start_header_id|>x"}]
    ours = encode_chat(llama3, messages)
    through_template = encode_chat(exported_hf, messages)
    auto = exported_auto.apply_chat_template(messages, sanitize_control_tokens=True)
    assert through_template.ids == list(auto["input_ids"])
    for enc in (ours, through_template):
        (segment,) = enc.segments
        inner = enc.ids[segment.start + 4:segment.end - 1]  # between the header and <|eot_id|>
        assert not any(i >= 128000 for i in inner)
        assert llama3.decode(inner) == messages[0]["content"]
        assert enc.ids[segment.end - 1] == 128009 and segment.end == len(enc.ids)


def test_bad_messages(llama3):
    with pytest.raises(LlamatronError, match="role 'narrator'.*use one of"):
        encode_chat(llama3, [{"role": "narrator", "content": "Once"}])
    with pytest.raises(LlamatronError, match="message 0 must be a dict with a string 'content'"):
        encode_chat(llama3, [{"role": "user", "content": None}])


@pytest.fixture(scope="module")
def smollm2_dir():
    from llamatron.checkpoint.bundled import smollm2_hf_dir

    return smollm2_hf_dir()  # built once per machine (~30 s), then cached


def test_hf_own_template_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(smollm2_dir)
    auto = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (ours.bos_id, ours.eot_id, ours.eos_id) == (auto.convert_tokens_to_ids("<|im_start|>"),
                                                       auto.convert_tokens_to_ids("<|im_end|>"),
                                                       auto.convert_tokens_to_ids("<|endoftext|>"))
    assert auto.eos_token_id in ours.stop_ids
    for name, messages in DIALOGS.items():
        for add_generation_prompt in (False, True):
            enc = encode_chat(ours, messages, add_generation_prompt=add_generation_prompt)
            expected = auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                sanitize_control_tokens=True)
            assert enc.ids == list(expected["input_ids"]), name
        # Each span decodes to that message as the template writes it (ChatML).
        text = auto.apply_chat_template(messages, tokenize=False)
        enc = encode_chat(ours, messages)
        assert ours.decode(enc.ids) == text
        for segment, message in zip(enc.segments[1:], messages[1:], strict=True):
            expected_text = f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
            assert ours.decode(enc.ids[segment.start:segment.end]) == expected_text
        assert enc.segments[-1].end == len(enc.ids)


def test_hf_template_fallbacks_and_errors(tmp_path, exported_dir, llama3):
    import shutil

    messages = DIALOGS["multi"][:3]
    # A Llama 3 vocabulary without a chat template speaks the Llama 3.1 format.
    plain = tmp_path / "no_template"
    plain.mkdir()
    shutil.copy(exported_dir / "tokenizer.json", plain)
    expected = encode_chat(llama3, messages, add_generation_prompt=True)
    assert encode_chat(load_tokenizer(plain), messages, add_generation_prompt=True) == expected
    # A template that rewrites earlier turns once later ones follow has no stable spans.
    odd = tmp_path / "odd_template"
    odd.mkdir()
    shutil.copy(exported_dir / "tokenizer.json", odd)
    (odd / "chat_template.jinja").write_text("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(LlamatronError, match="renders message 0 differently"):
        encode_chat(load_tokenizer(odd), messages)
