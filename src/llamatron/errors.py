"""Errors a user can fix. The CLI prints them as one line and exits with the code they carry."""


class LlamatronError(Exception):
    """A user mistake or bad input: the message says what is wrong and how to fix it (exit 2)."""

    exit_code = 2


class CheckFailedError(LlamatronError):
    """A verification ran and found a mismatch (exit 1, as the seed's CHECK would if it asserted)."""

    exit_code = 1


def collect_problems(problems: list[str], *, what: str) -> None:
    """Raise once with every problem found, so a user fixes them all in one go."""
    if not problems:
        return
    if len(problems) == 1:
        raise LlamatronError(f"{what}: {problems[0]}")
    listing = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    raise LlamatronError(f"{what}: {len(problems)} problems: {listing}")
