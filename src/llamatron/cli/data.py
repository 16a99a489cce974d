"""`llamatron data show`: the first samples a training run will see, in its exact order.

    llamatron data show --data-path out/corpus_text_document --seq-len 4096 --count 3
    llamatron data show --data-path 0.3 A 0.7 B --seq-len 128 --json --count 100

What a "sample" is depends on the data kind; SHOW_KINDS maps each kind to a function that returns the
samples as token-id lists, so SFT data can plug in beside pretraining data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import typer

from llamatron.errors import LlamatronError

data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)


@dataclass(kw_only=True)
class ShowRequest:
    data_path: list[str]
    seq_len: int
    seed: int
    split: str
    which: str
    count: int
    train_samples: int | None
    cache_dir: str | None


def _pretrain_samples(request: ShowRequest) -> list[list[int]]:
    """Samples of seq_len + 1 tokens from Megatron indexed datasets (GPTDataset order, blends)."""
    from llamatron.data.blend import build_blended_dataset, parse_blend

    wanted = request.train_samples
    if wanted is None and parse_blend(request.data_path).weights is not None:
        wanted = request.count  # a weighted blend is sized by the samples asked for
    dataset = build_blended_dataset(
        request.data_path, seq_len=request.seq_len, seed=request.seed, split=request.split,
        which=request.which, num_samples=wanted,
        cache_dir="auto" if request.cache_dir is None else (request.cache_dir or None),
    )
    return [dataset[i].tolist() for i in range(min(request.count, len(dataset)))]


# Data kind -> sample reader. Other kinds (e.g. "sft") register here.
SHOW_KINDS: dict[str, Callable[[ShowRequest], list[list[int]]]] = {"pretrain": _pretrain_samples}


def detect_kind(data_path: list[str]) -> str:
    from llamatron.data.sft import is_sft_data

    if any(is_sft_data(p) for p in data_path):
        return "sft"
    return "pretrain"


@data_app.command("show")
def show_command(
    more: list[str] = typer.Argument(None, metavar="[MORE_DATA_PATHS...]", show_default=False,
                                     help="Further --data-path values (prefixes or weight prefix pairs)."),
    data_path: list[str] = typer.Option(..., "--data-path", help="Dataset prefix(es), or a blend: 0.3 A 0.7 B."),
    seq_len: int = typer.Option(..., "--seq-len", help="Sequence length of a training sample."),
    seed: int = typer.Option(1234, "--seed", help="Data-order seed (Megatron's --seed)."),
    split: str = typer.Option("99,1,0", "--split", help="train,valid,test shares of the documents."),
    which: str = typer.Option("train", "--which", help="train, valid or test."),
    count: int = typer.Option(3, "--count", help="How many samples to show, from the first."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of samples, each its seq_len+1 token ids."),
    tokenizer: str = typer.Option("llama3", "--tokenizer", help="llama3 or a HF tokenizer directory (for decoding)."),
    train_samples: int | None = typer.Option(
        None, "--train-samples",
        help="Samples the run asks of this split (train_iters x global batch); sets the epoch count and "
             "blend sizes. Default: one epoch (a weighted blend: --count).",
    ),
    kind: str = typer.Option("auto", "--kind", help="Data kind: auto, " + ", ".join([*SHOW_KINDS, "sft"]) + "."),
    cache_dir: str | None = typer.Option(
        None, "--cache-dir", help="Where index caches go (default: 'cache/' beside the data; '' for none)."
    ),
) -> None:
    """Show the first samples of a split in training order (decoded, or token ids with --json)."""
    paths = [*data_path, *(more or [])]
    if count < 0:
        raise LlamatronError(f"--count {count} must be >= 0")
    kind = detect_kind(paths) if kind == "auto" else kind
    if kind == "sft":  # SFT rows, shown with their masked spans marked (llamatron.data.sft)
        from llamatron.data.sft import show_sft

        show_sft(paths, seq_len=seq_len, seed=seed, count=count, tokenizer=tokenizer, as_json=as_json)
        return
    if kind not in SHOW_KINDS:
        raise LlamatronError(f"--kind {kind!r} has no sample reader; use one of {', '.join(SHOW_KINDS)}")
    request = ShowRequest(
        data_path=paths, seq_len=seq_len, seed=seed, split=split, which=which, count=count,
        train_samples=train_samples, cache_dir=cache_dir,
    )
    samples = SHOW_KINDS[kind](request)
    if as_json:
        print(json.dumps(samples))
        return
    from llamatron.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    for i, sample in enumerate(samples):
        print(f"--- sample {i} ({len(sample)} tokens) ---")
        print(tok.decode([t for t in sample if 0 <= t < tok.vocab_size]))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
