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


def register(app: typer.Typer) -> None:
    app.command(
        "train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )(train_command)
