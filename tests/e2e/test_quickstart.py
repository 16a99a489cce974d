"""`llamatron quickstart` (what `make demo` runs), end to end on its reduced variant `--model tiny`: the
same seven commands (convert TP 3 x PP 2 with the check, preprocess, 2-process continued pretraining,
packed SFT, export, eval before/after, chat) on a random 4-layer model with SmolLM2's tokenizer and head
layout, then the report. The SmolLM2 run itself is `make demo` (minutes; the lead runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamatron.cli.main import main
from llamatron.cli.quickstart import parse_steps
from llamatron.errors import LlamatronError


@pytest.mark.slow
def test_tiny_quickstart_runs_every_step(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "llamatron.cli.main", "quickstart", "--model", "tiny",
                           "--workdir", str(work)], env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for number in range(1, 8):
        assert f"=== [{number}/7]" in out and f"--- step {number} done in" in out
    assert "$ llamatron convert hf-to-mcore" in out and "--tp 3 --pp 2 --check" in out
    assert "$ llamatron train --config" in out and "--nproc-per-node 2" in out
    assert "CMMLU demo set: accuracy before and after" in out
    assert "user: What do bees make?" in out and "after SFT:" in out
    # the 2-process run logged every iteration, and SFT's loss fell (tiny model, lr 3e-3, 8 steps)
    cpt = [json.loads(line) for line in (work / "runs/cpt/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in cpt] == [1, 2, 3] and "valid_loss" in cpt[-1]
    sft = [json.loads(line)["loss"] for line in (work / "runs/sft/metrics.jsonl").read_text().splitlines()]
    assert len(sft) == 8 and sum(sft[-3:]) < sum(sft[:3]), sft
    for name in ("before", "after"):
        results = json.loads((work / f"runs/sft/eval/{name}.json").read_text())["results"]
        assert results["cmmlu"]["n"] == 32
    report = (work / "runs/sft/report/report.md").read_text()
    assert "| iterations | 8 (8 logged) |" in report and "| after |" in report and "| before |" in report
    assert (work / "runs/sft/report/report.png").stat().st_size > 10_000
    # without --keep the model files go; what a person reads stays
    assert not (work / "mcore-tp3-pp2").exists() and not (work / "hf-sft").exists()
    assert not (work / "runs/sft/checkpoints").exists() and (work / "sft.yaml").is_file()


def test_parse_steps():
    assert parse_steps("1-7") == [1, 2, 3, 4, 5, 6, 7]
    assert parse_steps("6,1-2") == [1, 2, 6]
    for bad in ("0", "8", "a", "3-x", ""):
        with pytest.raises(LlamatronError):
            parse_steps(bad)


def test_a_later_step_without_its_inputs_is_one_clear_error(tmp_path, capsys):
    assert main(["quickstart", "--model", "tiny", "--workdir", str(tmp_path), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 6 needs" in err and "from step 1" in err
