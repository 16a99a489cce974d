"""bench/plan_depth_bench.py (the reduced-depth measurement `llamatron plan --from-measurement` reads):
its pure parts, and (slow) the script end to end on CPU at tiny scale, its JSON read back by the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamatron.checkpoint.hf import HFCheckpointReader
from llamatron.model.config import preset
from llamatron.plan.extrapolate import read_measurement
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))

import plan_depth_bench as bench  # noqa: E402 - bench/ is not a package


def test_summary_takes_the_peak_and_the_steady_mean():
    records = [{"peak_memory_gib": 10.0, "tokens_per_s_per_gpu": 1.0},
               {"peak_memory_gib": 12.0, "tokens_per_s_per_gpu": 90.0},
               {"peak_memory_gib": 11.5, "tokens_per_s_per_gpu": 110.0}]
    assert bench.summarize(records, warmup_steps=1) == {"peak_memory_gib": 12.0, "tokens_per_s_per_gpu": 100.0}
    cpu = [{"peak_memory_gib": None, "tokens_per_s_per_gpu": 5.0}]
    assert bench.summarize(cpu, warmup_steps=3) == {"peak_memory_gib": None, "tokens_per_s_per_gpu": 5.0}


def test_layout_comes_from_the_train_overrides():
    layout = bench.layout_from_overrides(["--parallel.tp=2", "--parallel.activation_checkpoint=full",
                                          "--parallel.sequence_parallel=true"])
    assert layout["tp"] == 2 and layout["activation_checkpoint"] == "full" and layout["sequence_parallel"]
    assert bench.layout_from_overrides([])["tp"] == 1


def test_cut_model_directory_reads_back(tmp_path):
    config = preset("llama3.1-70b").replace(num_layers=2)
    bench.write_model_dir(tmp_path / "m", config)
    read = HFCheckpointReader(tmp_path / "m").config
    assert (read.num_layers, read.hidden_size, read.ffn_hidden_size) == (2, 8192, 28672)


@pytest.mark.slow
def test_bench_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "depth.json"
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "plan_depth_bench.py"), "--model", "tiny", "--layers", "1", "2",
         "--seq-len", "32", "--steps", "2", "--warmup-steps", "1", "--device", "cpu", "--timeout", "300",
         "--json", str(out), "--", "--parallel.activation_checkpoint=full"],
        capture_output=True, text=True, env=env, timeout=700, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measurement = read_measurement(out)
    assert [run.layers for run in measurement.runs] == [1, 2]
    assert measurement.layout.activation_checkpoint == "full"
    assert all(run.tokens_per_s_per_gpu > 0 and run.peak_memory_gib is None for run in measurement.runs)
    from llamatron.cli.main import main

    assert main(["plan", "--from-measurement", str(out), "--target-gpus", "2,4", "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [t["gpus"] for t in result["targets"]] == [2, 4] and result["residual_gib"] is None


def test_plan_check_reads_train_bench_output(tmp_path, capsys, monkeypatch):
    """bench/plan_check.py on a train_bench result shaped like the 2 x H200 8B FSDP2 run of BENCHMARKS.md
    (plain loss): the prediction for it, its layout and options taken from the run's overrides."""
    import plan_check

    bench = {"model": "llama3.1-8b", "seq_len": 8192, "micro_batch": 1, "gpus": 2, "global_batch": 2,
             "precision": "bf16", "device": "NVIDIA H200",
             "runs": [{"variant": "eager", "overrides": ["--training.fused_loss=false", "--training.compile=false"],
                       "peak_memory_gib": 110.3},
                      {"variant": "tp2", "overrides": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
                       "peak_memory_gib": None},
                      {"variant": "compile", "overrides": ["--training.compile=true"], "peak_memory_gib": 90.0}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    monkeypatch.setattr(sys, "argv", ["plan_check.py", str(path), "--json", str(tmp_path / "rows.json")])
    assert plan_check.main() == 0
    eager, tp2, compiled = json.loads((tmp_path / "rows.json").read_text())
    # The trainer now drops the logits before backward (the measured run kept them: +1.96 GiB).
    assert eager["predicted_gib"] == pytest.approx(110.3 - 1.96, rel=0.01) and eager["layout"] == "tp1 pp1 cp1 dp2"
    assert tp2["layout"] == "tp2 pp1 cp1 dp1" and tp2["error"] is None
    assert compiled["compile"] and compiled["predicted_gib"] < eager["predicted_gib"]
    assert "| llama3.1-8b | 2 | 8192 |" in capsys.readouterr().out
