"""Write the Llama 3 tokenizer as HF files, so transformers (and our HF adapter) load it from a
checkpoint directory and encode exactly as the tiktoken tokenizer does.

The byte-level BPE is converted by transformers' TikTokenConverter (the converter HF used for the
official Llama 3 files); the chat template is our own Jinja text for the Llama 3.1 format of
`llamatron.tokenizer.chat`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llamatron.tokenizer.llama3 import PATTERN, Llama3Tokenizer, ranks_path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
MODEL_MAX_LENGTH = 131072

# The Llama 3.1 format of llamatron.tokenizer.chat, as a transformers chat template. Pass
# default_system=True to apply_chat_template for the date system block Llama 3.1 Instruct expects.
# (Raw string: the \n escapes are for Jinja's string literals.)
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if default_system is defined and default_system and messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def build_tokenizer_json(tok: Llama3Tokenizer) -> str:
    """tokenizer.json text: byte-level BPE with the Llama 3 split pattern and special tokens, and a
    post-processor that prepends bos (what `tokenizer(text)` does for the official files)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(ranks_path()), pattern=PATTERN,
                                  extra_special_tokens=list(tok.special_tokens)).converted()
    bos_id = tok.special_tokens[BOS]
    converted.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return converted.to_str()


def tokenizer_config(tok: Llama3Tokenizer) -> dict:
    added = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for name, i in tok.special_tokens.items()}
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        # The end-of-text token, the EOD of pretraining data; chat stops are in generation_config.
        "eos_token": EOS,
        "pad_token": PAD,
        "chat_template": LLAMA31_CHAT_TEMPLATE,
        # False so decode(encode(text)) == text; the official files set True, which rewrites " ." to ".".
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def export_hf_tokenizer(out_dir: Path, *, tok: Llama3Tokenizer | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`
    (created if needed; other files there are left alone). Each file appears whole or not at all."""
    tok = tok or Llama3Tokenizer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    _write_text(out_dir / "tokenizer.json", build_tokenizer_json(tok))
    _write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(tok), indent=2) + "\n")
    _write_text(out_dir / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
