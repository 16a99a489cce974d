"""`llamatron train --dry-run`: the resolved plan for a valid command, every problem of a bad one in one
line (exit 2), and nothing launched or written either way."""

from __future__ import annotations

from llamatron.cli.main import main
from tests.conftest import write_random_corpus


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    corpus = tmp_path / "corpus_text_document"
    write_random_corpus(corpus, seed=0, documents=10)
    out = tmp_path / "run"
    code = main(["train", "--config", "tiny-debug", "--output", str(out), f"--data.data_path={corpus}",
                 "--nproc-per-node", "2", "--train-iters", "7", "--dry-run"])
    assert code == 0
    text = capsys.readouterr().out
    assert "the configuration is valid; nothing was trained" in text
    assert "mesh pp 1 x dp 2 x cp 1 x tp 1" in text
    # tiny-debug: micro 2, global 8 over dp 2 -> 2 accumulation steps; 8 x 64 tokens per iteration
    assert "micro 2 x accumulation 2 x dp 2 = global 8; sequence 64: 512 tokens per iteration" in text
    assert "7 iterations" in text and "4 layers" in text
    assert not out.exists()


def test_dry_run_reports_every_problem_at_once(tmp_path, capsys):
    code = main(["train", "--config", "tiny-debug", "--output", str(tmp_path / "run"),
                 f"--data.data_path={tmp_path / 'missing'}", "--nproc-per-node", "3", "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("llamatron: error: llamatron train --dry-run found problems") and err.count("\n") == 1
    assert "missing.bin/.idx does not exist" in err
    # global batch 8 does not split into micro batches of 2 over 3 data-parallel ranks
    assert "global_batch_size" in err and "3" in err
    assert not (tmp_path / "run").exists()


def test_dry_run_of_a_multi_node_command_needs_the_rendezvous(tmp_path, capsys):
    corpus = tmp_path / "corpus_text_document"
    write_random_corpus(corpus, seed=0, documents=10)
    args = ["train", "--config", "tiny-debug", "--output", str(tmp_path / "run"), f"--data.data_path={corpus}",
            "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "0", "--dry-run"]
    assert main(args) == 2
    assert "needs --master-addr and --master-port" in capsys.readouterr().err
    assert main([*args, "--master-addr", "10.0.0.1", "--master-port", "29500"]) == 0
    assert "processes  4 (2 node(s) x 2)" in capsys.readouterr().out
