"""`llamatron train` end to end on CPU: SFT on the shipped instruction set, the seed's launcher script
with its own example arguments (MODEL_SIZE=tiny), and the clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamatron.cli.main import main
from tests.conftest import write_random_corpus

REPO = Path(__file__).resolve().parents[2]
DEMO_SFT = REPO / "src" / "llamatron" / "assets" / "sft" / "demo_alpaca.jsonl"
LAUNCHER = REPO / "examples" / "llama3_1" / "run_mcore_llama3_1.sh"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "LLAMATRON": f"{sys.executable} -m llamatron.cli.main"}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("seed") / "wudao_llama3bpe_content_document"
    write_random_corpus(prefix, seed=1, documents=300)
    return prefix


def test_sft_on_packed_demo_set_learns(tmp_path):
    out = tmp_path / "sft"
    code = main([
        "train", "--config", "tiny-debug", "--output", str(out), "--data.kind=sft", f"--data.data_path={DEMO_SFT}",
        "--data.packing=true", "--training.seq_len=256", "--train-iters", "12", "--training.eval_interval=0",
        "--optim.lr=3e-3", "--optim.min_lr=3e-4",
    ])
    assert code == 0
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_seed_pretraining_example_runs_through_the_launcher(tmp_path, corpus):
    # The seed's example, arguments as written except MODEL_SIZE (tiny) and paths; TP=PP=CP=1.
    args = ["dsw", "tiny", "1", "8", "1e-5", "1e-6", "128", "128", "bf16", "1", "1", "1", "true", "true", "true",
            "false", "false", "false", "100000", str(corpus), str(corpus), "none", "10000", "100", str(tmp_path)]
    proc = subprocess.run(["bash", str(LAUNCHER), *args], env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "checkpoint").iterdir())
    assert len(runs) == 1
    assert runs[0].name == ("pretrain-mcore-llama3-1-tiny-lr-1e-5-minlr-1e-6-bs-1-gbs-8-seqlen-128-pr-bf16-tp-1-pp-1-"
                            "cp-1-ac-false-do-true-sp-true-ti-9-wi-0")
    records = _metrics(runs[0])
    assert [r["iteration"] for r in records] == list(range(1, 10))  # 10000 tokens // (8 * 128)
    assert (tmp_path / "tensorboard").is_dir()


def test_seed_sft_example_runs_through_the_launcher(tmp_path):
    args = ["dsw", "tiny", "1", "8", "1e-5", "1e-6", "128", "128", "bf16", "1", "1", "1", "true", "true", "true",
            "true", "false", "false", "100000", str(DEMO_SFT), str(DEMO_SFT), "none", "4", "1", str(tmp_path)]
    env = {**_env(), "MP_DATASET_TYPE": "raw"}
    proc = subprocess.run(["bash", str(LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "checkpoint").iterdir())
    assert run.name.startswith("finetune-mcore-llama3-1-tiny-") and run.name.endswith("-ti-4-wi-1")
    assert len(_metrics(run)) == 4


def test_model_parallel_degrees_beyond_the_processes_are_refused(tmp_path, corpus, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "x"), f"--data.data_path={corpus}",
                 "--cp", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "world size 1 is not divisible by tp*pp*cp = 1*1*2" in err, err
    assert not (tmp_path / "x").exists()


def test_infeasible_config_lists_every_problem(tmp_path, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "x"),
                 "--training.global_batch_size=7", "--optim.lr=1e-5", "--optim.min_lr=1e-3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "global_batch_size (7)" in err and "min_lr" in err and "data_path" in err
    code = main(["train", "--config", "tiny-debug", "--bogus.key=1", "--optim.lrr=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--bogus.key" in err and "--optim.lrr" in err


def test_global_batch_must_split_over_the_processes(tmp_path, corpus, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "x"), f"--data.data_path={corpus}",
                 "--training.global_batch_size=6", "--training.micro_batch_size=3", "--nproc-per-node", "4"])
    assert code == 2
    assert "global batch 6 is not divisible by micro batch 3 x data-parallel size 4" in capsys.readouterr().err


def test_non_finite_steps_are_skipped_counted_and_abort(tmp_path, corpus, capsys):
    # An absurd learning rate blows the weights up: every later step is non-finite and skipped.
    out = tmp_path / "nan"
    code = main(["train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}",
                 "--optim.lr=1e30", "--optim.min_lr=1e29", "--training.max_skipped_steps=3", "--train-iters", "20",
                 "--training.eval_interval=0"])
    assert code == 2
    assert "steps skipped for non-finite values" in capsys.readouterr().err
    records = _metrics(out)
    skipped = [r["skipped_steps"] for r in records]
    # Iteration 1 steps (and breaks the weights); 2, 3, 4 are skipped and logged; 5 is the 4th skip > 3.
    assert skipped == [0, 1, 2, 3]


def test_profile_window_writes_a_trace_and_a_kernel_table(tmp_path, corpus):
    out = tmp_path / "prof"
    code = main(["train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}",
                 "--train-iters", "4", "--logging.profile_iterations=2,3"])
    assert code == 0
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    # The trace holds the profiled steps' operators (the model's matmuls), not an empty window.
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names or "aten::matmul" in names
    table = (out / "profile" / "kernels_rank0.txt").read_text()
    assert table.startswith("iterations 2..3") and "Self CPU" in table


def test_a_bad_profile_window_is_refused(tmp_path, corpus, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "x"), f"--data.data_path={corpus}",
                 "--logging.profile_iterations=3,2"])
    assert code != 0
    assert "logging.profile_iterations must be FIRST,LAST" in capsys.readouterr().err
