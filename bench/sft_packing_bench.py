"""SFT throughput, packed against padded, in real (non-pad) tokens/s (issue 8 scenario (c)).

Data: generated alpaca-like records, not copied from any dataset: total lengths (chat template included)
drawn from a log-normal with --median-len (250) and --sigma (0.6: 90% of samples under ~540 tokens, 99%
under ~1000, as instruction data such as alpaca), clipped to [--min-len, --max-len]; about a third of each
sample's text is the prompt (masked), the rest the response. Text is made of common English words that
the Llama 3 tokenizer encodes as one token each, so a sample's token count is close to its drawn length;
the tokenized distribution is printed and written to the JSON.

Variants (each a `llamatron train` run on the same records, rows of --seq-len tokens):
- packed: data.packing=true, several samples per row, attention isolated between them (document mask);
- padded: data.packing=false, one sample per row padded to the row length (the seed's PAD_LEN behaviour
  with PAD_LEN = the row length).
Real tokens/s per GPU = non-pad tokens in the steps after --warmup-steps / their summed step time / GPUs,
the tokens counted from the same dataset the trainer reads (same seed, same order). Also reported:
trained (labelled) tokens/s, the row fill, and the trainer's all-token tokens/s and MFU (the same
convention as bench/train_bench.py).

One GPU, the 1B shape:
    python bench/sft_packing_bench.py --model llama3.2-1b --seq-len 2048 --micro-batch 4 --steps 20 --out sft.json
On a CPU, to check the script:
    python bench/sft_packing_bench.py --model tiny --seq-len 256 --micro-batch 2 --steps 3 --warmup-steps 1 \\
        --samples 200 --median-len 40 --device cpu --precision fp32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import run_trainer, summarize  # noqa: E402 - the bench directory is not a package

# Common English words that the Llama 3 tokenizer encodes as one token each (with a leading space).
_WORD_TEXT = (
    "the of and to in is it that for on with as was at by be this are from or have an they which one you were "
    "all we can her has there been if more when will would who so no time about up out said what its into than "
    "them only two other new some could these may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three"
)
WORDS = _WORD_TEXT.split()
TEMPLATE_TOKENS = 11  # BOS, two role headers (3 + 1 each), two <|eot_id|>: the Llama 3 chat template's own tokens
PROMPT_SHARE = 0.35
VARIANTS = {"packed": ["--data.packing=true"], "padded": ["--data.packing=false"]}


def sample_lengths(count: int, *, median: float, sigma: float, min_len: int, max_len: int, seed: int = 0) -> np.ndarray:
    """Total token lengths per sample: log-normal(ln median, sigma), rounded and clipped. (count,) int64."""
    rng = np.random.default_rng(seed)
    lengths = np.rint(rng.lognormal(mean=np.log(median), sigma=sigma, size=count))
    return np.clip(lengths, min_len, max_len).astype(np.int64)


def make_records(lengths: np.ndarray, *, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records (instruction, input, output) whose chat-formatted token count is about each length."""
    rng = np.random.default_rng(seed + 1)
    records = []
    for length in lengths.tolist():
        content = max(2, length - TEMPLATE_TOKENS)
        prompt = max(1, round(PROMPT_SHARE * content))
        words = rng.choice(len(WORDS), size=content)
        text = [WORDS[i] for i in words]
        records.append({"instruction": " ".join(text[:prompt]), "input": "", "output": " ".join(text[prompt:])})
    return records


def step_token_counts(dataset, *, steps: int, global_batch: int, pad_id: int) -> tuple[list[int], list[int]]:
    """Non-pad and labelled tokens of each step's global batch: step s trains on samples
    [s * global_batch, (s + 1) * global_batch) of the dataset's order (train/batching.py)."""
    real, trained = [], []
    for step in range(steps):
        items = [dataset[i] for i in range(step * global_batch, (step + 1) * global_batch)]
        real.append(int(sum((item["tokens"] != pad_id).sum() for item in items)))
        trained.append(int(sum((item["labels"] != -100).sum() for item in items)))
    return real, trained


def summarize_sft(records: list[dict], *, real: list[int], trained: list[int], warmup_steps: int, gpus: int,
                  step_tokens: int) -> dict:
    """Real and trained tokens/s per GPU over the steps after the warm-up ones, and the row fill (real
    tokens / all tokens of the rows; step_tokens = global batch * row length)."""
    steady = slice(warmup_steps, len(records))
    time_s = sum(r["step_time_s"] for r in records[steady])
    real_steady, trained_steady = sum(real[steady]), sum(trained[steady])
    return {
        "real_tokens_per_s_per_gpu": real_steady / time_s / gpus,
        "trained_tokens_per_s_per_gpu": trained_steady / time_s / gpus,
        "fill": sum(real) / (step_tokens * len(real)),
    }


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    return {"samples": int(len(lengths)), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)), "p99": float(np.percentile(lengths, 99)),
            "max": int(lengths.max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seq-len", type=int, default=2048, help="row length, packed and padded")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--median-len", type=float, default=250)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=None, help="default: --seq-len")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default="packed,padded")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more --section.field=value override for every run, written --extra=--a.b=c; repeatable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", default="sft_packing_bench.json")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants):
        parser.error(f"variants are {', '.join(VARIANTS)}")

    import torch

    from llamatron.data.sft import build_sft_dataset
    from llamatron.model import preset
    from llamatron.tokenizer import load_tokenizer
    from llamatron.train.metrics import device_peak_tflops, flops_per_token

    max_len = args.max_len or args.seq_len
    work = Path(tempfile.mkdtemp(prefix="llamatron-sft-bench-"))
    data = work / "alpaca_like.jsonl"
    lengths = sample_lengths(args.samples, median=args.median_len, sigma=args.sigma, min_len=args.min_len,
                             max_len=max_len)
    with data.open("w") as f:
        for record in make_records(lengths):
            f.write(json.dumps(record) + "\n")
    tokenizer = load_tokenizer("llama3")
    global_batch = args.micro_batch * args.nproc
    peak = device_peak_tflops(torch.device(args.device)) if args.device == "cuda" and torch.cuda.is_available() else None
    fpt = flops_per_token(preset(args.model), seq_len=args.seq_len)
    common = [
        f"--model.name={args.model}", "--data.kind=sft", f"--data.data_path={data}", "--data.sft_format=raw",
        f"--training.seq_len={args.seq_len}", f"--training.micro_batch_size={args.micro_batch}",
        f"--training.global_batch_size={global_batch}", f"--train-iters={args.steps}",
        f"--training.precision={args.precision}", "--training.eval_interval=0", f"--training.device={args.device}",
        "--checkpoint.save_interval=1000000", "--checkpoint.save_at_end=false", "--logging.tensorboard=false",
        "--logging.log_interval=1", "--optim.lr=1e-5", "--optim.min_lr=1e-6",
    ]
    rows, tokenized = [], None
    for variant in variants:
        print(f"== {variant}", flush=True)
        # The trainer's dataset, built the same way (same records, options and seed), to count its tokens.
        dataset = build_sft_dataset(data, fmt="raw", tokenizer=tokenizer, seq_len=args.seq_len,
                                    packing=variant == "packed", cache_dir=work / "cache")
        if tokenized is None:
            tokenized = {**length_stats(dataset.rows.samples.lengths), "reader": dataset.stats}
        real, trained = step_token_counts(dataset, steps=args.steps, global_batch=global_batch,
                                          pad_id=tokenizer.pad_id)
        records, wall = run_trainer(work / f"run-{variant}", [*common, *VARIANTS[variant], *args.extra],
                                    nproc=args.nproc, timeout=args.timeout)
        rows.append({
            "variant": variant, "wall_s": wall, "rows": len(dataset),
            **summarize_sft(records, real=real, trained=trained, warmup_steps=args.warmup_steps, gpus=args.nproc,
                            step_tokens=global_batch * args.seq_len),
            **summarize(records, warmup_steps=args.warmup_steps, tokens_per_step=global_batch * args.seq_len,
                        gpus=args.nproc, flops_per_token=fpt, peak_tflops=peak),
        })
    result = {
        "model": args.model, "row_tokens": args.seq_len, "micro_batch": args.micro_batch, "gpus": args.nproc,
        "precision": args.precision, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "drawn_lengths": length_stats(lengths), "tokenized_lengths": tokenized,
        "device": torch.cuda.get_device_name() if peak is not None else args.device, "torch": torch.__version__,
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{args.model}, rows of {args.seq_len}, micro batch {args.micro_batch}, {args.nproc} GPU(s), "
          f"{args.precision}, {result['device']}; tokenized samples: {json.dumps(tokenized)}")
    print("| variant | real tokens/s/GPU | trained tokens/s/GPU | row fill | all tokens/s/GPU | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['variant']} | {r['real_tokens_per_s_per_gpu']:,.0f} | {r['trained_tokens_per_s_per_gpu']:,.0f} | "
              f"{100 * r['fill']:.1f}% | {r['tokens_per_s_per_gpu']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} |")
    by_name = {r["variant"]: r for r in rows}
    if {"packed", "padded"} <= by_name.keys():
        ratio = by_name["packed"]["real_tokens_per_s_per_gpu"] / by_name["padded"]["real_tokens_per_s_per_gpu"]
        result["packed_over_padded"] = ratio
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"packed / padded, real tokens/s: {ratio:.2f}x (target >= 3x)")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
