"""`llamatron eval`: CMMLU / C-Eval (lm-eval's protocol) on a HF or Megatron-Core checkpoint, and
`llamatron eval ppl`: perplexity on a Megatron indexed dataset. `--nproc-per-node N` relaunches under
torchrun; each rank scores a slice of the questions and rank 0 reports."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from llamatron.cli.options import DTYPE_HELP, parse_dtype, pick_device
from llamatron.errors import LlamatronError

_LAUNCH_FLAGS = ("--nproc-per-node",)

eval_app = typer.Typer(
    help="Evaluate a model: CMMLU / C-Eval multiple choice (default) or perplexity (`eval ppl`).",
    invoke_without_command=True, no_args_is_help=False,
)


def _relaunch(argv: list[str], *, nproc: int) -> int:
    from llamatron.cli.launch import relaunch

    return relaunch(argv, command="eval", launcher=[f"--nproc-per-node={nproc}", "--standalone"], strip=_LAUNCH_FLAGS)


def _parse_batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise LlamatronError(f"--batch-size {value!r}: use a positive integer or auto")
    return int(value)


def _init_distributed(device_name: str):
    """(device, rank, world): torchrun's environment, else one process."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return pick_device(device_name), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return device, dist.get_rank(), world


@eval_app.callback()
def mc_command(
    ctx: typer.Context,
    model: Path | None = typer.Option(None, "--model", help="HF directory or Megatron-Core checkpoint (any TP x PP)."),
    tasks: str = typer.Option("cmmlu,ceval-valid", "--tasks", help="cmmlu, ceval-valid, mc, or subjects such as cmmlu_agronomy."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Extracted CMMLU / C-Eval files (cmmlu/ and ceval/ inside, or one task's files)."),
    shots: int = typer.Option(0, "--shots", help="Few-shot examples: the first K of the dev split."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N questions of each subject."),
    batch_size: str = typer.Option("auto", "--batch-size", help="Rows per forward pass, or auto."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="llama3 or a HF directory (Megatron-Core checkpoints default to llama3)."),
    add_bos: bool | None = typer.Option(None, "--add-bos/--no-add-bos", help="Prepend BOS (default: as the model's HF tokenizer does, like lm-eval)."),
    output: Path | None = typer.Option(None, "--output", help="Write results.json here."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Add per-question log-likelihoods to results.json."),
    nproc_per_node: int | None = typer.Option(None, "--nproc-per-node", help="Data parallel: start torchrun with N workers."),
) -> int | None:
    """CMMLU and C-Eval with lm-evaluation-harness's protocol (prompts, shots, acc / acc_norm, weighted groups)."""
    if ctx.invoked_subcommand is not None:
        return None
    if model is None or data_dir is None:
        raise LlamatronError("eval needs --model DIR and --data-dir DIR (or use `llamatron eval ppl ...`)")
    if nproc_per_node is not None and nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(ctx.obj["argv"], nproc=nproc_per_node))
    from llamatron.eval.runner import EvalConfig
    from llamatron.eval.tasks import resolve_tasks

    selections = resolve_tasks(tasks)
    config = EvalConfig(shots=shots, limit=limit, batch_size=_parse_batch_size(batch_size), add_bos=add_bos)
    run_config = {"model": str(model), "tasks": tasks, "data_dir": str(data_dir), "num_fewshot": shots,
                  "limit": limit, "batch_size": batch_size, "dtype": dtype, "add_bos": add_bos}
    _run_mc(model=model, data_dir=data_dir, selections=selections, config=config, run_config=run_config,
            dtype=dtype, device_name=device, tokenizer=tokenizer, output=output, log_samples=log_samples)
    return None


def _run_mc(*, model, data_dir, selections, config, run_config, dtype, device_name, tokenizer, output,
            log_samples) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llamatron.checkpoint.loader import load_model
    from llamatron.eval.report import print_tables, results_document, write_results
    from llamatron.eval.runner import aggregate, build_prompts, gather_results, score_prompts

    device, rank, world = _init_distributed(device_name)
    llama, tok = load_model(model, device=device, dtype=parse_dtype(dtype), tokenizer=tokenizer)
    prompts = build_prompts(selections, data_dir=data_dir, tok=tok, config=config,
                            max_length=llama.config.max_position_embeddings)
    mine = prompts[rank::world]
    start = time.monotonic()
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=rank != 0, transient=False) as progress:
        bar = progress.add_task("eval", total=sum(len(p.rows) for p in mine))
        local = score_prompts(llama, mine, batch_size=config.batch_size,
                              on_batch=lambda n: progress.advance(bar, n))
    results = gather_results(local)
    if rank != 0:
        return
    elapsed = time.monotonic() - start
    metrics = aggregate(results, selections)
    print_tables(metrics, selections)
    print(f"llamatron: {len(results)} questions in {elapsed:.1f} s ({len(results) / elapsed:.1f} questions/s, "
          f"{world} process{'es' if world > 1 else ''})", file=sys.stderr)
    if output is not None:
        document = results_document(metrics, config={**run_config, "world_size": world},
                                    samples=results if log_samples else None)
        write_results(output, document)
        print(f"llamatron: wrote {output}", file=sys.stderr)


@eval_app.command("ppl")
def ppl_command(
    model: Path = typer.Option(..., "--model", help="HF directory or Megatron-Core checkpoint."),
    data_path: str = typer.Option(..., "--data-path", help="Indexed dataset prefix (P for P.bin / P.idx)."),
    seq_len: int = typer.Option(..., "--seq-len", help="Window length."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    max_windows: int | None = typer.Option(None, "--max-windows", help="Only the first N windows."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    output: Path | None = typer.Option(None, "--output", help="Write the result as JSON here."),
) -> None:
    """Perplexity on a Megatron indexed dataset (consecutive windows over the concatenated tokens)."""
    from dataclasses import asdict

    from llamatron.checkpoint.atomic import atomic_write_bytes
    from llamatron.checkpoint.loader import load_model
    from llamatron.eval.perplexity import perplexity

    llama, _ = load_model(model, device=pick_device(device), dtype=parse_dtype(dtype))
    result = perplexity(llama, data_path, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                        log=lambda msg: print(f"llamatron: {msg}", file=sys.stderr))
    print(f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f} over {result.tokens} tokens, "
          f"{result.windows} windows of {seq_len})")
    if output is not None:
        document = {"results": asdict(result), "config": {"model": str(model), "data_path": data_path, "seq_len": seq_len}}
        atomic_write_bytes(output, (json.dumps(document, indent=2) + "\n").encode())


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
