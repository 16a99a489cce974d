"""Preprocessing throughput: llamatron preprocess vs Megatron-LM's tools/preprocess_data.py.

    python bench/preprocess_bench.py --size-mb 200 --workers 2 --megatron-lm /path/to/Megatron-LM \
        --work-dir /tmp/prep_bench --json bench_preprocess.json

Generates mixed Chinese/English JSONL from word lists (no downloaded data), runs both tools with the
same worker count and the same Llama 3 token ids (Megatron: HuggingFaceTokenizer on a tokenizer
directory exported by llamatron; no BOS, --append-eod), checks the outputs are byte-identical, and
writes documents/s, tokens/s and MB/s of each (wall time of the whole command, startup included).
Megatron-LM is not vendored: pass a checkout whose `megatron/core` imports on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

EN = ["the", "model", "data", "train", "token", "layer", "attention", "memory", "parallel", "tensor", "pipeline", "gradient", "batch", "learning", "rate", "schedule", "checkpoint", "convert", "evaluate", "language", "corpus", "sentence", "river", "mountain", "city", "history", "science", "music", "people", "world", "system", "network", "quickly", "slowly", "beautiful", "important"]
ZH = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民"
      "得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社")


def generate(path: Path, size_mb: float, *, seed: int = 0) -> None:
    """JSONL of random paragraphs alternating English sentences and Chinese clauses."""
    rng = random.Random(seed)
    target = size_mb * 2**20
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            parts = []
            for _ in range(rng.randint(3, 40)):
                if rng.random() < 0.5:
                    words = " ".join(rng.choice(EN) for _ in range(rng.randint(5, 25)))
                    parts.append(words.capitalize() + ".")
                else:
                    parts.append("".join(rng.choice(ZH) for _ in range(rng.randint(8, 40))) + "。")
            line = json.dumps({"text": " ".join(parts), "id": written}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode())


def timed(cmd: list[str], *, env: dict | None = None, cwd: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--megatron-lm", type=Path, required=True, help="Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/prep_bench"))
    parser.add_argument("--json", type=Path, default=Path("bench_preprocess.json"))
    args = parser.parse_args()

    from llamatron.data.indexed import IndexedDataset
    from llamatron.tokenizer.export import export_hf_tokenizer

    args.work_dir.mkdir(parents=True, exist_ok=True)
    corpus = args.work_dir / "mixed.jsonl"
    if not corpus.exists() or corpus.stat().st_size < args.size_mb * 2**20:
        generate(corpus, args.size_mb)
    tok_dir = args.work_dir / "hf_tokenizer"
    export_hf_tokenizer(tok_dir)

    ours = args.work_dir / "ours"
    ours_s = timed([sys.executable, "-m", "llamatron.cli.main", "preprocess", "--input", str(corpus),
                    "--output-prefix", str(ours), "--append-eod", "--workers", str(args.workers)])
    theirs = args.work_dir / "megatron"
    env = dict(os.environ, PYTHONPATH=str(args.megatron_lm))
    theirs_s = timed([sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(theirs),
                      "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir), "--append-eod",
                      "--workers", str(args.workers)], env=env, cwd=str(args.megatron_lm))
    a, b = f"{ours}_text_document", f"{theirs}_text_document"
    identical = all(Path(a + s).read_bytes() == Path(b + s).read_bytes() for s in (".bin", ".idx"))
    ds = IndexedDataset(a)
    docs, tokens, mb = len(ds), ds.num_tokens, corpus.stat().st_size / 2**20
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "workers": args.workers, "input_mb": round(mb, 1),
        "documents": docs, "tokens": tokens, "identical_outputs": identical,
        "llamatron": {"seconds": ours_s, "docs_per_s": docs / ours_s, "tokens_per_s": tokens / ours_s, "mb_per_s": mb / ours_s},
        "megatron": {"seconds": theirs_s, "docs_per_s": docs / theirs_s, "tokens_per_s": tokens / theirs_s, "mb_per_s": mb / theirs_s},
        "speedup": theirs_s / ours_s,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
