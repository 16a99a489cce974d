"""Records -> ids and labels with a non-Llama-3 HF tokenizer (SmolLM2's ChatML template), against
transformers' apply_chat_template."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamatron.data.packing import IGNORE_INDEX
from llamatron.data.sft import SFTOptions, encode_records
from llamatron.data.sft_records import load_records

RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue.", "system": "Be brief."},
    {"instruction": "And now?", "output": "Still here.", "system": "S", "history": [["Are you there?", "Yes."]]},
]


@pytest.fixture(scope="module")
def hf_dir():
    from llamatron.checkpoint.bundled import smollm2_hf_dir

    return smollm2_hf_dir()


def test_hf_chat_template_ids_and_assistant_labels(tmp_path, hf_dir):
    from transformers import AutoTokenizer

    from llamatron.tokenizer import load_tokenizer

    ref = AutoTokenizer.from_pretrained(hf_dir)

    def render(messages):
        out = ref.apply_chat_template(messages, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    samples = encode_records(path, tokenizer=load_tokenizer(hf_dir), options=SFTOptions(seq_len=512))
    for k, record in enumerate(load_records(path).records):
        messages = list(record.messages)
        ids, labels = samples.sample(k)
        want = render(messages)
        assert ids.tolist() == want
        trained = np.zeros(len(want), bool)
        for i, message in enumerate(messages):  # a turn spans from the end of the previous prefix to its own
            if message["role"] == "assistant":
                trained[len(render(messages[:i])) : len(render(messages[: i + 1]))] = True
        expected = np.full(len(want), IGNORE_INDEX)
        expected[:-1] = np.where(trained[1:], np.asarray(want)[1:], IGNORE_INDEX)
        assert labels.tolist() == expected.tolist()
