"""`llamatron report RUN_DIR`: the PNG and the markdown summary from a run directory, and one-line errors.

The run directory is written here with known numbers (metrics.jsonl as the trainer writes it, the
resolved config.yaml, an eval results file), so every figure in the summary is checked against a value
computed independently in the test (exact for counts, 1e-4 for printed floats).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llamatron.cli.main import main
from llamatron.config.job import JobConfig
from llamatron.config.load import dump_yaml


def _write_run(root: Path, *, iterations: int = 10, world: int = 2) -> list[dict]:
    root.mkdir(parents=True)
    config = JobConfig(output=str(root))
    config.data.data_path = ["corpus_text_document"]
    config.training.train_iters = iterations
    config.training.seq_len = 64
    config.training.global_batch_size = 4
    (root / "config.yaml").write_text(dump_yaml(config))
    records = []
    for it in range(1, iterations + 1):
        record = {
            "iteration": it, "loss": 5.0 - 0.3 * it, "lr": 1e-3 * (1 - it / (iterations + 1)),
            "grad_norm": 2.0 / it, "consumed_samples": 4 * it, "consumed_tokens": 256 * it,
            "tokens_per_s": 100.0 * world + it, "tokens_per_s_per_gpu": (100.0 * world + it) / world,
            "step_time_s": 2.5, "mfu": None, "peak_memory_gib": None, "skipped_steps": 0, "loss_scale": None,
            "eta_s": 0.0,
        }
        if it % 5 == 0:
            record.update({"valid_loss": 4.0 - 0.2 * it, "valid_ppl": 1.0})
        records.append(record)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_report_writes_png_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run)
    (run / "eval").mkdir()
    (run / "eval" / "after.json").write_text(json.dumps({
        "results": {"cmmlu": {"acc": 0.4375, "acc_norm": 0.4375, "n": 32},
                    "cmmlu_agronomy": {"acc": 0.5, "acc_norm": 0.5, "n": 8}},
        "config": {"model": "/models/hf-sft"},
    }))
    (run / "eval" / "notes.json").write_text("[1, 2]")  # not a results file: ignored, not an error

    assert main(["report", str(run)]) == 0
    assert "report.png" in capsys.readouterr().out
    with Image.open(run / "report" / "report.png") as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 500
    text = (run / "report" / "report.md").read_text()
    assert "| iterations | 10 (10 logged) |" in text
    assert "| tokens consumed | 2,560 |" in text
    assert "| time in the training loop | 25.0 s |" in text  # 10 windows of 2.5 s
    assert "| tokens/s (whole run) | 102.4 |" in text  # 2560 tokens / 25 s
    # median of tokens_per_s_per_gpu after the first record: (200 + 2..10) / 2 -> (200 + 6) / 2
    assert "| tokens/s per process (median after the first record) | 103.0 on 2 process(es) |" in text
    assert f"| train loss, mean of the first 3 records | {5.0 - 0.3 * 2:.4f} |" in text
    assert f"| train loss, mean of the last 3 records | {5.0 - 0.3 * 9:.4f} |" in text
    assert f"| validation loss, last | {4.0 - 0.2 * 10:.4f} |" in text
    assert "| gradient norm, last | 0.200 |" in text
    assert "| after | /models/hf-sft | 0.4375 (32) |" in text
    assert "notes" not in text
    assert "sequence 64, micro batch 1, global batch 4" in text
    assert "![loss, learning rate, gradient norm and throughput](report.png)" in text


def test_report_out_dir_and_rewrite(tmp_path):
    run = tmp_path / "run"
    _write_run(run, iterations=3, world=1)
    out = tmp_path / "elsewhere"
    assert main(["report", str(run), "--out", str(out)]) == 0
    first = (out / "report.md").read_text()
    assert "No evaluation results" in first and "on 1 process(es)" in first
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"iteration": 4, "loss": 1.0, "lr": 0.0, "grad_norm": 1.0, "consumed_tokens": 1024,
                                 "step_time_s": 1.0, "tokens_per_s": 1.0, "tokens_per_s_per_gpu": 1.0}) + "\n")
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert "| iterations | 4 (4 logged) |" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "report.png"]  # no temporary files left


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "has no metrics.jsonl"),
        (lambda root: (root.mkdir(), (root / "metrics.jsonl").write_text("")), "is empty"),
        (lambda root: (root.mkdir(), (root / "metrics.jsonl").write_text('{"iteration": 1}\n{oops\n')),
         "metrics.jsonl:2: not valid JSON"),
        (lambda root: (root.mkdir(), (root / "metrics.jsonl").write_text('{"loss": 1.0}\n')),
         "without an integer 'iteration'"),
    ],
)
def test_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, setup, message):
    root = tmp_path / "run"
    setup(root)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamatron: error: ") and message in err and err.count("\n") == 1
    assert not (root / "report").exists()
