"""`llamatron generate`: text from a checkpoint, streamed to the terminal as it is produced."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from llamatron.cli.options import DTYPE_HELP, parse_dtype, pick_device


def generate_command(
    model: Path = typer.Option(..., "--model", help="HF directory or Megatron-Core checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", help="The text to continue, or the user message with --chat."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat format as a user turn."),
    system: str | None = typer.Option(None, "--system", help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens to generate."),
    greedy: bool = typer.Option(False, "--greedy", help="Deterministic: always the most likely token."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(1234, "--seed", help="Sampling seed."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer (llama3 or a HF directory) when the checkpoint carries none."
    ),
) -> None:
    """Generate text with a KV cache (greedy or top-p sampling)."""
    from llamatron.checkpoint.loader import load_model
    from llamatron.eval.generate import SamplingConfig, generate
    from llamatron.tokenizer.chat import encode_chat

    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed
    )
    llama, tok = load_model(model, device=pick_device(device), dtype=parse_dtype(dtype), tokenizer=tokenizer)
    llama.eval()
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = encode_chat(tok, messages, add_generation_prompt=True).ids
    else:
        prompt_ids = tok.encode(prompt, bos=tok.bos_id is not None)
    stop_ids = tuple(tok.stop_ids)

    streamed: list[int] = []
    printed = ""

    def on_token(token: int) -> None:
        # Decode the whole answer each time so multi-byte characters split across tokens print whole.
        nonlocal printed
        if token in stop_ids:
            return
        streamed.append(token)
        text = tok.decode(streamed)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text

    generate(llama, prompt_ids, sampling=sampling, stop_ids=stop_ids, on_token=on_token)
    final = tok.decode(streamed)
    sys.stdout.write(final[len(printed) :] + "\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
