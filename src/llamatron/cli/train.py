"""`llamatron train`: a recipe plus overrides; launches torchrun itself with --nproc-per-node."""

from __future__ import annotations

import os

import typer

_LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def _launch_torchrun(
    argv: list[str], *, nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int
) -> int:
    from llamatron.cli.launch import relaunch

    launcher = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
                f"--master-addr={master_addr}", f"--master-port={master_port}"]
    if nnodes == 1 and master_port == 0:
        launcher = [f"--nproc-per-node={nproc}", "--standalone"]
    return relaunch(argv, command="train", launcher=launcher, strip=_LAUNCH_FLAGS)


def train_command(
    ctx: typer.Context,
    config: str | None = typer.Option(None, "--config", help="Recipe: a YAML path or a name in recipes/."),
    output: str | None = typer.Option(None, "--output", help="Run directory; rerunning on it resumes."),
    train_iters: int | None = typer.Option(None, "--train-iters", help="Optimizer steps."),
    save_interval: int | None = typer.Option(None, "--save-interval", help="Checkpoint every N iterations."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor parallel degree."),
    pp: int | None = typer.Option(None, "--pp", help="Pipeline parallel degree."),
    cp: int | None = typer.Option(None, "--cp", help="Context parallel degree."),
    nproc_per_node: int | None = typer.Option(None, "--nproc-per-node", help="Start torchrun with N workers."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes (with --nproc-per-node)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank (multi-node)."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Rendezvous host (multi-node)."),
    master_port: int = typer.Option(0, "--master-port", help="Rendezvous port (multi-node)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the config, the layout for this many processes, the model and the data "
        "paths, print the resolved plan, and exit without training (weights are read when training starts)."),
) -> None:
    """Continued pretraining or SFT. Any config field: --section.field=value (e.g. --optim.lr=3e-4)."""
    from llamatron.config.load import load_config
    from llamatron.errors import LlamatronError

    overrides = list(ctx.args)
    cfg = load_config(config, overrides)
    flags = {
        "output": output, "training.train_iters": train_iters, "checkpoint.save_interval": save_interval,
        "parallel.tp": tp, "parallel.pp": pp, "parallel.cp": cp,
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key == "output":
            cfg.output = value
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        if key == "training.train_iters":
            cfg.training.train_tokens = None
    if dry_run:
        _dry_run(cfg, nproc_per_node=nproc_per_node or 1, nnodes=nnodes, master_port=master_port)
        return
    cfg.validate()
    from llamatron.errors import collect_problems
    from llamatron.train.trainer import check_supported, layout_problems

    check_supported(cfg)
    if nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        collect_problems(layout_problems(cfg, world_size=nproc_per_node * nnodes), what="infeasible configuration")
    if nnodes > 1 and master_port == 0:
        raise LlamatronError("multi-node training needs --master-addr and --master-port of node 0")
    # One process on one node needs no launcher (and no rendezvous port to race for).
    single = nproc_per_node in (None, 1) and nnodes == 1
    if not single and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(_launch_torchrun(
            ctx.obj["argv"], nproc=nproc_per_node or 1, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
            master_port=master_port,
        ))
    from llamatron.train.trainer import train

    train(cfg)


def _missing_data(paths: list[str], *, kind: str, what: str) -> list[str]:
    """Data paths that name nothing on disk (blend weights skipped)."""
    from pathlib import Path

    found = []
    for path in paths:
        try:
            float(path)
            continue  # a blend weight: 0.3 A 0.7 B
        except ValueError:
            pass
        # An SFT idxmap may be named by the prefix given to preprocess-sft or by the one it wrote.
        suffixes = ("", "_text_document") if kind == "sft" else ("",)
        present = Path(path).is_file() if path.endswith((".json", ".jsonl")) else any(
            Path(path + suffix + ".bin").is_file() and Path(path + suffix + ".idx").is_file() for suffix in suffixes)
        if not present:
            expected = "the file" if path.endswith((".json", ".jsonl")) else f"{path}.bin/.idx"
            found.append(f"{what} {path}: {expected} does not exist ({kind} data)")
    return found


def _dry_run(cfg, *, nproc_per_node: int, nnodes: int, master_port: int) -> None:
    """Every problem a launch would hit before the first step, reported at once; else the resolved plan."""
    from llamatron.errors import LlamatronError, collect_problems
    from llamatron.parallel.mesh import ParallelDims
    from llamatron.train.batching import BatchPlan
    from llamatron.train.run_dir import resolve_schedule
    from llamatron.train.setup import resolve_model_config
    from llamatron.train.trainer import layout_problems, unsupported_features

    world = nproc_per_node * nnodes
    problems = cfg.problems()
    problems += [f"not yet supported: {feature}" for feature in unsupported_features(cfg)]
    if nnodes > 1 and master_port == 0:
        problems.append("multi-node training needs --master-addr and --master-port of node 0")
    d = cfg.data
    problems += _missing_data(d.data_path, kind=d.kind, what="data.data_path")
    problems += _missing_data(d.valid_data_path, kind=d.kind, what="data.valid_data_path")
    model = None
    try:
        model = resolve_model_config(cfg)
        problems += layout_problems(cfg, world_size=world)
    except LlamatronError as err:
        problems.append(str(err))
    schedule = None
    if not cfg.problems():
        try:
            schedule = resolve_schedule(cfg)
        except LlamatronError as err:
            problems.append(str(err))
    collect_problems(problems, what="llamatron train --dry-run found problems")
    p, t, o = cfg.parallel, cfg.training, cfg.optim
    dims = ParallelDims(world_size=world, tp=p.tp, pp=p.pp, cp=p.cp)
    batch = BatchPlan(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size, dp_rank=0,
                      dp_size=dims.dp)
    source = cfg.model.init_from or f"random init (seed {t.seed})"
    rows = [
        ("processes", f"{world} ({nnodes} node(s) x {nproc_per_node}); mesh pp {dims.pp} x dp {dims.dp} x cp "
                      f"{dims.cp} x tp {dims.tp}"),
        ("model", f"{cfg.model.name or 'as init_from'}: {model.num_layers} layers, hidden {model.hidden_size}, "
                  f"{model.num_heads} heads / {model.num_kv_heads} KV groups, vocab {model.vocab_size}, "
                  f"{model.num_params() / 1e9:.2f}B parameters"),
        ("weights", f"{source}{' (finetune: counters from zero)' if cfg.model.finetune else ''}"),
        ("data", f"{d.kind}: {' '.join(d.data_path)}"
                 + (f"; valid {' '.join(d.valid_data_path)}" if d.valid_data_path else f"; split {d.split}")),
        ("batch", f"micro {t.micro_batch_size} x accumulation {batch.grad_accum_steps} x dp {dims.dp} = global "
                  f"{t.global_batch_size}; sequence {t.seq_len}: {t.global_batch_size * t.seq_len:,} tokens per "
                  "iteration"),
        ("schedule", f"{schedule.train_iters} iterations (warmup {schedule.warmup_iters}, decay "
                     f"{schedule.decay_iters}); lr {o.lr} -> {o.min_lr} {o.decay_style}"),
        ("precision", f"{t.precision}; sequence parallel {p.sequence_parallel}; activation checkpointing "
                      f"{p.activation_checkpoint}; optimizer offload {p.optimizer_offload}; distributed optimizer "
                      f"{p.distributed_optimizer}"),
        ("output", f"{cfg.output} (checkpoint every {cfg.checkpoint.save_interval} iterations; rerunning resumes)"),
    ]
    print("llamatron train --dry-run: the configuration is valid; nothing was trained")
    for name, value in rows:
        print(f"  {name:<10} {value}")


def register(app: typer.Typer) -> None:
    app.command(
        "train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )(train_command)
