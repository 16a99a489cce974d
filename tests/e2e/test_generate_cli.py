"""`llamatron generate` on SmolLM2-135M-Instruct: greedy tokens equal transformers' greedy generate
(fp32, 32 new tokens, three chat prompts); the CLI prints the same text; bad model directories give
one error line and exit 2."""

from __future__ import annotations

import pytest
import torch

from llamatron.checkpoint.bundled import smollm2_hf_dir
from llamatron.checkpoint.loader import load_model
from llamatron.cli.main import main
from llamatron.eval.generate import SamplingConfig, generate
from llamatron.tokenizer.chat import encode_chat

transformers = pytest.importorskip("transformers")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_hf_dir()
    model, tokenizer = load_model(path, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, tokenizer, reference


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(smollm2):
    _, model, tokenizer, reference = smollm2
    for prompt in PROMPTS:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids
        ours = generate(model, ids, sampling=SamplingConfig(max_new_tokens=32, greedy=True),
                        stop_ids=tokenizer.stop_ids)
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                        eos_token_id=list(tokenizer.stop_ids), pad_token_id=tokenizer.eos_id)
        assert ours == theirs[0, len(ids):].tolist(), prompt
        assert len(ours) >= 8


@pytest.mark.slow
def test_cli_prints_the_greedy_answer(smollm2, capsys):
    path, model, tokenizer, _ = smollm2
    prompt = PROMPTS[0]
    ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids
    expected = tokenizer.decode([t for t in generate(model, ids, sampling=SamplingConfig(max_new_tokens=16, greedy=True),
                                                     stop_ids=tokenizer.stop_ids) if t not in tokenizer.stop_ids])
    code = main(["generate", "--model", str(path), "--prompt", prompt, "--chat", "--greedy", "--max-new-tokens", "16",
                 "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llamatron: error:") and "Traceback" not in err
    return err


def test_bad_model_directories_give_one_line_and_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "does not exist" in _one_error_line(capsys)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (gpt2 / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["generate", "--model", str(gpt2), "--prompt", "hi"]) == 2
    assert "not a Llama model" in _one_error_line(capsys)


def test_corrupt_safetensors_gives_one_line_and_exit_2(tmp_path, capsys):
    from llamatron.checkpoint.hf import save_hf_model
    from llamatron.model import build_model
    from tests.conftest import tiny_config

    out = save_hf_model(build_model(tiny_config(), seed=0), tmp_path / "tiny", tokenizer=None)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--tokenizer", "llama3"]) == 2
    assert "model.safetensors" in _one_error_line(capsys)


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("convert", "check", "preprocess", "train", "eval", "generate", "export", "quickstart", "data"):
        assert command in out
