"""The console script switches PyTorch's huge-page CPU allocations on before torch is imported, unless the
user chose (src/llamatron/cli/main.py says why)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import subprocess_env


def _value_after_import(**env: str) -> str:
    probe = "import os, sys; import llamatron.cli.main; print(os.environ['THP_MEM_ALLOC_ENABLE'], 'torch' in sys.modules)"
    base = {k: v for k, v in subprocess_env().items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


def test_huge_pages_are_on_unless_the_user_set_them():
    assert _value_after_import() == "1 False"  # set before anything imported torch
    assert _value_after_import(THP_MEM_ALLOC_ENABLE="0") == "0 False"
