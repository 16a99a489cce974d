"""Re-launching a subcommand under torchrun (`--nproc-per-node N`), shared by train and eval."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def strip_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """argv without `flags` and their values (`--flag value` or `--flag=value`), so the workers do not
    launch again."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.split("=", 1)[0] in flags:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def relaunch(argv: Sequence[str], *, command: str, launcher: Sequence[str], strip: Sequence[str]) -> int:
    """Run `llamatron <command> <argv after command, minus strip>` under torchrun with `launcher` options.
    Returns the exit code; the workers print their own errors."""
    from torch.distributed.run import get_args_parser, run

    worker_args = strip_flags(list(argv)[list(argv).index(command) + 1 :], strip)
    args = get_args_parser().parse_args([*launcher, "-m", "llamatron.cli.main", command, *worker_args])
    try:
        run(args)
    except Exception as err:  # torchrun's ChildFailedError
        print(f"llamatron: error: {command} failed in a worker ({type(err).__name__}); see its output above",
              file=sys.stderr)
        return 1
    return 0
