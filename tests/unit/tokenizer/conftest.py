"""Tokenizers loaded once per test session (each takes seconds): ours, Meta's reference, and the
exported HF files loaded both by transformers and by our HF adapter."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llama3():
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def meta():
    """Meta's own Llama 3 tokenizer from llama-models: the reference for ids and chat format."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory, llama3):
    from llamatron.tokenizer.export import export_hf_tokenizer

    out = tmp_path_factory.mktemp("llama3_hf_tokenizer")
    export_hf_tokenizer(out, tok=llama3)
    return out


@pytest.fixture(scope="session")
def exported_auto(exported_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported_dir)


@pytest.fixture(scope="session")
def exported_hf(exported_dir):
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer(exported_dir)
