"""`llamatron plan` end to end (in process): the table, the recommended layout's `llamatron train`
command (its options must parse into the trainer's config), JSON output, extrapolation from a measured
file, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from llamatron.cli.main import main
from llamatron.config.job import JobConfig
from llamatron.config.load import apply_overrides
from llamatron.model.config import preset, to_hf_config


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_8b_on_8_gpus_table_json_and_command(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, out, _ = _run(capsys, "--model", "8B", "--gpus", "8", "--seq-len", "8192", "--gpu-mem", "80",
                      "--global-batch", "64", "--json", str(path))
    assert rc == 0
    assert "llamatron plan: llama3.1-8b, 8 GPUs" in out and "Recommended:" in out
    assert "llamatron train --nproc-per-node=8 --model.name=llama3.1-8b" in out
    plan = json.loads(path.read_text())
    best = plan["recommended"]
    assert best["fits"] and best["memory_gib"]["total"] <= 80
    assert plan["candidates"][0] == {k: v for k, v in best.items() if k != "train_command"}
    command = best["train_command"]
    assert command[:3] == ["llamatron", "train", "--nproc-per-node=8"]
    config = apply_overrides(JobConfig(), command[3:])
    layout = best["layout"]
    assert (config.parallel.tp, config.parallel.pp, config.parallel.cp) == (layout["tp"], layout["pp"], layout["cp"])
    assert config.parallel.activation_checkpoint == layout["activation_checkpoint"]
    assert (config.training.seq_len, config.training.global_batch_size) == (8192, 64)


def test_bf16_gradient_reduction_reaches_the_command_and_the_time(capsys):
    args = ("--model", "8B", "--gpus", "64", "--seq-len", "8192", "--gpu-mem", "80", "--json", "-")
    plans = []
    for extra in ((), ("--grad-reduce-in-bf16",)):
        rc, out, _ = _run(capsys, *args, *extra)
        assert rc == 0
        plans.append(json.loads(out))
    fp32, bf16 = (plan["recommended"] for plan in plans)
    assert bf16["layout"]["grad_reduce_in_bf16"] and not fp32["layout"]["grad_reduce_in_bf16"]
    options = [o for o in bf16["train_command"] if o.split("=")[0].count(".")]  # the config's, not torchrun's
    assert apply_overrides(JobConfig(), options).parallel.grad_reduce_in_bf16
    assert "--parallel.grad_reduce_in_bf16=true" not in fp32["train_command"]
    # Across 8 nodes the gradient reduction is exposed; in bf16 it moves 2 bytes a parameter less.
    assert bf16["relative_overhead"] < fp32["relative_overhead"]


def test_json_to_stdout_and_defaults(capsys):
    rc, out, _ = _run(capsys, "--model", "tiny", "--gpus", "2", "--seq-len", "128", "--json", "-")
    assert rc == 0
    plan = json.loads(out)  # nothing but the JSON on stdout
    assert plan["request"]["gpu_mem_gib"] > 0 and plan["request"]["nodes"] == 1
    assert plan["recommended"]["fits"]


def test_hf_directory_model(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(preset("llama3.2-1b"))))
    rc, out, _ = _run(capsys, "--model", str(tmp_path), "--gpus", "1", "--seq-len", "4096", "--micro-batch", "2",
                      "--gpu-mem", "141", "--json", "-")
    assert rc == 0
    plan = json.loads(out)
    assert f"--model.name={tmp_path}" in plan["recommended"]["train_command"]


def test_nothing_fits_is_said_not_an_error(capsys):
    rc, out, _ = _run(capsys, "--model", "70B", "--gpus", "8", "--seq-len", "8192", "--gpu-mem", "80",
                      "--host-mem", "560")
    assert rc == 0
    assert "No layout fits" in out and "host memory per node" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "13B", "--gpus", "8", "--seq-len", "8192"], "unknown model preset '13B'"),
    (["--model", "8B", "--gpus", "8", "--nodes", "3", "--seq-len", "8192"], "--nodes 3 does not divide --gpus 8"),
    (["--model", "8B", "--gpus", "8", "--seq-len", "8192", "--tp", "3"], "not divisible by tp*pp*cp"),
    (["--model", "8B", "--gpus", "16", "--nodes", "2", "--seq-len", "8192", "--tp", "16"],
     "no layout with tp=16: tp=16 is above the model's 8 KV heads"),
    (["--model", "8B", "--gpus", "8"], "missing --seq-len"),
    (["--model", "8B", "--gpus", "8", "--seq-len", "8192", "--tp", "0", "--gpu-mem", "-1"],
     "--tp must be >= 1, got 0; --gpu-mem must be positive"),
    (["--model", "8B", "--gpus", "8", "--seq-len", "8192", "--precision", "int4"], "--precision 'int4'"),
    (["--model", "8B", "--gpus", "8", "--seq-len", "8192", "--ac", "some"], "--ac 'some'"),
    (["--model", "8B", "--gpus", "8", "--seq-len", "8192", "--precision", "fp32", "--grad-reduce-in-bf16"],
     "--grad-reduce-in-bf16 needs --precision bf16 or fp8"),
    (["--gpus", "8", "--from-measurement", "/nonexistent/m.json"], "no such file"),
])
def test_user_mistakes_are_one_line(capsys, args, message):
    rc, _, err = _run(capsys, *args)
    assert rc == 2
    assert err.startswith("llamatron: error: ") and err.count("\n") == 1 and message in err, err


def test_from_measurement(capsys, tmp_path):
    measured = {
        "model": "llama3.1-70b", "gpus": 2, "seq_len": 8192, "micro_batch": 1, "global_batch": 2,
        "precision": "bf16", "fused_loss": True, "card": "NVIDIA H200",
        "layout": {"activation_checkpoint": "full", "ac_layers": 1},
        # Near what the model predicts for this run (38.1 and 51.0 GiB).
        "runs": [{"layers": 2, "peak_memory_gib": 38.9, "tokens_per_s_per_gpu": 4000.0},
                 {"layers": 4, "peak_memory_gib": 52.1, "tokens_per_s_per_gpu": 2200.0}],
    }
    source = tmp_path / "measured.json"
    source.write_text(json.dumps(measured))
    out_path = tmp_path / "extrapolated.json"
    rc, out, _ = _run(capsys, "--from-measurement", str(source), "--target-gpus", "8,64", "--gpu-mem", "141",
                      "--optimizer-offload", "static", "--json", str(out_path))
    assert rc == 0 and "Measured llama3.1-70b on 2 GPU(s)" in out
    result = json.loads(out_path.read_text())
    assert [t["gpus"] for t in result["targets"]] == [8, 64]
    assert all(t["layers"] == 80 and t["layout"]["optimizer_offload"] == "static" for t in result["targets"])
    eight, sixty_four = result["targets"]
    assert sixty_four["corrected_allocated_gib"] < eight["corrected_allocated_gib"]
    assert eight["tokens_per_s_per_gpu"] > 0 and result["residual_gib"] is not None
    assert result["warning"] is None
    # A measurement far from the model (here: memory per layer a third of the model's) is flagged.
    measured["runs"][1]["peak_memory_gib"] = 43.0
    source.write_text(json.dumps(measured))
    rc, out, _ = _run(capsys, "--from-measurement", str(source), "--gpus", "8", "--gpu-mem", "141")
    assert rc == 0 and "Warning: the measured memory grows by" in out
