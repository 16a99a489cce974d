"""Every ```bash block of docs/*.md and README.md is run here, at tiny scale, in page order.

How a block is run depends on its info string:
- ```bash            run as written. Absolute paths under /mnt, /workspace and /path/to are moved under a
                     temporary root, where the fixtures below put tiny stand-ins of what the seed
                     downloads (the "Meta-Llama-3.1-8B" directory is a 4-layer HF Llama with 4 KV groups and
                     the Llama 3 vocabulary, so TP 4 x PP 2 and the check work as on the real model). Later
                     pages use what earlier pages wrote, as a reader would.
- ```bash dry-run    GPU-scale training: each `llamatron train` gets --dry-run (config, layout for that many
                     processes, model and data paths checked; nothing launched).
- ```bash seed       the seed's own commands, quoted from Pai-Megatron-Patch's guide. Those that call the
                     seed-compatible scripts llamatron ships (`bash hf2mcore_convertor_llama3_1.sh ...`,
                     `sh run_mcore_llama3_1.sh ...`) run as written, in their own root: the converter for
                     real, the launcher with --dry-run added (8 GPUs per node). The rest (git clone, wget,
                     tar, lm_eval) are third-party downloads and tools and are not run.
- ```bash not-run    installation and `make` targets (`make demo` is tests/e2e/test_quickstart.py, `make
                     test` is this suite); only the commands listed in NOT_RUN_ALLOWED may appear there.
Pass/fail is the command's exit code (0), as a user would see it. docs/BENCHMARKS.md holds GPU benchmark
commands run by hand on GPUs and is left out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llamatron.cli.main import main

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "src" / "llamatron" / "assets"
PAGES = [*sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "BENCHMARKS.md"), REPO / "README.md"]
TAGS = {"", "dry-run", "seed", "not-run"}
NOT_RUN_ALLOWED = {"make", "pip", "git", "cd"}
SEED_PATHS = re.compile(r"(^|=)(/mnt|/workspace|/path/to)(?=/|$)")
SEED_CHECKOUT = "/workspace/Pai-Megatron-Patch/"
# The seed's commands that some llamatron versions still refuse, with the refusal: that exact message is
# an expected failure (xfail); any other failure fails, and passing passes.
KNOWN_GAPS: dict[str, str] = {}
FENCE = re.compile(r"^```(bash|sh|shell)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: str
    index: int
    tag: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}{'-' + self.tag if self.tag else ''}"


def read_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        for index, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8"))):
            blocks.append(Block(page=page.name, index=index, tag=match.group(2).strip(), text=match.group(3)))
    return blocks


def commands(text: str) -> list[list[str]]:
    """Shell lines as argv lists: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def relocate(arg: str, root: Path) -> str:
    return SEED_PATHS.sub(lambda m: f"{m.group(1)}{root}{m.group(2)}", arg)


BLOCKS = read_blocks()


def test_every_block_is_tagged_and_every_page_is_read():
    assert {"03-convert.md", "07-evaluate.md", "migration.md", "troubleshooting.md"} <= {p.name for p in PAGES}
    bad = [b.id for b in BLOCKS if b.tag not in TAGS]
    assert not bad, f"unknown info strings (use one of {sorted(TAGS)}): {bad}"
    # Each page that quotes the seed also shows llamatron's command.
    for page in {b.page for b in BLOCKS if b.tag == "seed"}:
        assert any(b.page == page and b.tag in ("", "dry-run") for b in BLOCKS), page


# ---- tiny stand-ins for what the seed downloads ----------------------------------------------------


def _write_tiny_llama(out: Path) -> None:
    from llamatron.checkpoint.hf import save_hf_model
    from llamatron.model import LlamaConfig, build_model
    from llamatron.tokenizer.export import export_hf_tokenizer

    config = LlamaConfig(vocab_size=128256, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4,
                         ffn_hidden_size=128, max_position_embeddings=1024, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=128001)
    save_hf_model(build_model(config, seed=7), out, dtype=torch.float32)
    export_hf_tokenizer(out)


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / "sft" / name).read_text(encoding="utf-8").splitlines() if line]


def _populate(root: Path) -> None:
    ckpts, data = root / "mnt" / "llama3-ckpts", root / "mnt" / "llama3-datasets"
    _write_tiny_llama(ckpts / "Meta-Llama-3.1-8B")
    data.mkdir(parents=True)
    corpus = [json.loads(line)["text"] for line in (ASSETS / "corpus" / "demo_corpus.jsonl").read_text().splitlines()]
    with open(data / "wudao.jsonl", "w", encoding="utf-8") as handle:
        for text in corpus * 3:
            handle.write(json.dumps({"content": text}, ensure_ascii=False) + "\n")
    train, valid = _records("demo_alpaca.jsonl"), _records("demo_valid.jsonl")
    for name, records in (("alpaca_zh-train-general.json", train), ("alpaca_zh-valid-general.json", valid),
                          ("alpaca_zh-llama3-train.json", train), ("alpaca_zh-llama3-valid.json", valid)):
        (data / name).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    shutil.copytree(ASSETS / "eval" / "cmmlu_demo", root / "workspace" / "cmmlu")
    header = "id,question,A,B,C,D,answer,explanation\n"
    rows = ["0,TCP 属于哪一层协议？,应用层,传输层,网络层,物理层,B,", "1,IPv4 地址有多少位？,16,32,64,128,B,"]
    for split in ("dev", "val"):
        folder = root / "workspace" / "ceval" / split
        folder.mkdir(parents=True)
        (folder / f"computer_network_{split}.csv").write_text(header + "\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    _populate(root)
    return root


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory, docs_root) -> Path:
    """The seed's world: its downloads already in place (a ready .bin/.idx, an SFT idxmap, a checkpoint).
    Copied from docs_root before any block ran, so both start from the same stand-ins."""
    from llamatron.checkpoint.convert import hf_to_mcore
    from tests.conftest import write_random_corpus

    root = tmp_path_factory.mktemp("seed")
    for name in ("mnt", "workspace"):
        shutil.copytree(docs_root / name, root / name)
    data = root / "mnt" / "llama3-datasets"
    write_random_corpus(data / "wudao_llama3bpe_content_document", seed=3, documents=200)
    assert main(["preprocess-sft", "--input", str(data / "alpaca_zh-train-general.json"), "--output-prefix",
                 str(data / "path_to_your_dataset"), "--seq-len", "128"]) == 0
    hf_to_mcore(root / "mnt/llama3-ckpts/Meta-Llama-3.1-8B", root / "path/to/pretraining/checkpoint", tp=1, pp=1)
    wrapper = root / "llamatron_dry_run.py"
    wrapper.write_text(
        "import sys\nfrom llamatron.cli.main import main\nargs = sys.argv[1:]\n"
        "sys.exit(main(args + ['--dry-run'] if args[:1] == ['train'] else args))\n"
    )
    return root


# ---- running ---------------------------------------------------------------------------------------


def _subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), env.get("PYTHONPATH")]))
    return env


def _launches(argv: list[str]) -> bool:
    """A command that starts torchrun itself (never inside the pytest process)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--nproc-per-node=") else (
            argv[i + 1] if arg == "--nproc-per-node" and i + 1 < len(argv) else None)
        if value is not None and int(value) > 1:
            return True
    return False


def run_llamatron(argv: list[str], *, env: dict[str, str], capsys) -> None:
    if _launches(argv) and "--dry-run" not in argv:
        proc = subprocess.run([sys.executable, "-m", "llamatron.cli.main", *argv], env=_subprocess_env(env),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"llamatron {shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = main(argv)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = capsys.readouterr()
    assert code == 0, f"llamatron {shlex.join(argv)} exited {code}\n{out.out[-2000:]}\n{out.err[-2000:]}"


def run_block(block: Block, *, root: Path, capsys) -> None:
    env: dict[str, str] = {}
    for argv in commands(block.text):
        if argv[0] == "export":
            key, _, value = argv[1].partition("=")
            env[key] = value
            continue
        assert argv[0] == "llamatron", f"{block.id}: runnable blocks hold llamatron commands only, got {argv[0]}"
        args = [relocate(a, root) for a in argv[1:]]
        if block.tag == "dry-run":
            assert args[0] == "train", f"{block.id}: dry-run blocks hold `llamatron train` commands"
            args.append("--dry-run")
        run_llamatron(args, env=env, capsys=capsys)


def run_seed_block(block: Block, *, root: Path) -> int:
    """Run the lines that call llamatron's seed-compatible scripts; returns how many ran."""
    cwd, env, ran = None, {"GPUS_PER_NODE": "8", "LLAMATRON": f"{sys.executable} {root / 'llamatron_dry_run.py'}"}, 0
    for argv in commands(block.text):
        if argv[0] == "cd":
            target = argv[1]
            cwd = REPO / target[len(SEED_CHECKOUT):] if target.startswith(SEED_CHECKOUT) else None
            cwd = cwd if cwd is not None and cwd.is_dir() else None
        elif argv[0] == "export":
            key, _, value = argv[1].partition("=")
            env[key] = value
        elif argv[0] in ("bash", "sh") and cwd is not None and (cwd / argv[1]).is_file():
            args = [relocate(a, root) for a in argv[2:]]
            proc = subprocess.run([argv[0], argv[1], *args], cwd=cwd, env=_subprocess_env(env),
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{block.id}: {shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            ran += 1
        # anything else is the seed's own tooling (git, wget, tar, mkdir, lm_eval): quoted, not run
    return ran


def _marks(block: Block):
    slow = block.tag == "" and any(_launches(argv) for argv in commands(block.text))
    return [pytest.mark.slow] if slow else []


@pytest.fixture(scope="module")
def blocks_run() -> set[str]:
    """The ids of the blocks already run in this worker's docs_root."""
    return set()


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=_marks(b)) for b in BLOCKS])
def test_docs_block(block, docs_root, seed_root, blocks_run, capsys):
    # Later pages use what earlier pages wrote, but pytest-xdist may hand the earlier blocks to the other
    # worker (or -m may deselect them): run, in this worker's root, every earlier block not yet run here.
    for earlier in BLOCKS[: BLOCKS.index(block)]:
        if earlier.id not in blocks_run and earlier.id not in KNOWN_GAPS:
            _run_any(earlier, docs_root=docs_root, seed_root=seed_root, capsys=capsys)
            blocks_run.add(earlier.id)
    gap = KNOWN_GAPS.get(block.id)
    blocks_run.add(block.id)
    try:
        _run_any(block, docs_root=docs_root, seed_root=seed_root, capsys=capsys)
    except AssertionError as err:
        if gap is not None and gap in str(err):
            pytest.xfail(f"not supported yet: {gap}")
        raise


def _run_any(block: Block, *, docs_root: Path, seed_root: Path, capsys) -> None:
    if block.tag == "not-run":
        for argv in commands(block.text):
            assert argv[0] in NOT_RUN_ALLOWED, f"{block.id}: {argv[0]} must run in a tested block"
            if argv[0] == "make":
                assert argv[1:] and argv[1] in ("demo", "test", "install", "test-quick", "lint"), argv
        return
    if block.tag == "seed":
        ran = run_seed_block(block, root=seed_root)
        scripts = [a for a in commands(block.text) if a[0] in ("bash", "sh")]
        assert ran == len(scripts), f"{block.id}: {len(scripts) - ran} seed script call(s) not found in the repo"
        return
    run_block(block, root=docs_root, capsys=capsys)
