"""The `llamatron` console script: one Typer app, one module per subcommand.

Each subcommand module exposes `register(app)`. Errors of type LlamatronError become one line on
stderr and their exit code; `--debug` (or LLAMATRON_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

# CPU tensors of 2 MiB and more in transparent huge pages (PyTorch's own switch, read once when torch first
# allocates, so it is set before any subcommand imports torch; a value the user set stands). Training on a
# CPU allocates large buffers every step and each first touch of a 4 KiB page faults: 8 steps of the tiny
# model took 42-48 s with it against 59-67 s without on a 2-core VM.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Subcommand modules under llamatron.cli, in the order `--help` lists them.
COMMAND_MODULES = [
    "convert", "check",
    "preprocess", "preprocess_sft", "data",
    "train", "plan", "export", "eval",
    "generate", "report",
    "quickstart",
]

app = typer.Typer(
    name="llamatron",
    help="LLaMA 3.x end to end: convert HF <-> Megatron-Core, preprocess, train (CPT/SFT), evaluate, generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    if debug:
        os.environ["LLAMATRON_DEBUG"] = "1"


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"llamatron.cli.{name}")
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    from llamatron.errors import LlamatronError

    _register_commands()
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args or os.environ.get("LLAMATRON_DEBUG") == "1"
    try:
        # The raw arguments travel in ctx.obj for commands that re-launch themselves (train under torchrun).
        result = app(args=args, standalone_mode=False, obj={"argv": args})
    except LlamatronError as err:
        if debug:
            raise
        print(f"llamatron: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("llamatron: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            return err.exit_code
        if isinstance(err, click.exceptions.Abort):
            return 1
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
