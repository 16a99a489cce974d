"""`llamatron convert` / `llamatron check` end to end, and the seed's converter script.

SmolLM2-135M has 3 KV groups and 9 heads, so TP 2 is invalid for it (Megatron splits whole groups):
its check runs at TP 3 x PP 2, and TP 2 must be refused with a clear error.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamatron.checkpoint.hf import TOKENIZER_FILES, save_hf_model
from llamatron.cli.main import main
from llamatron.model import build_model
from tests.conftest import subprocess_env, tiny_config

REPO = Path(__file__).resolve().parents[2]
SEED_SCRIPT = REPO / "toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama3_1.sh"


@pytest.fixture(scope="module")
def smollm2():
    from llamatron.checkpoint.bundled import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def smollm2_tp3pp2(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "mcore-fp32"
    assert main(["convert", "hf-to-mcore", "--hf", str(smollm2), "--out", str(out), "--tp", "3", "--pp", "2",
                 "--dtype", "fp32"]) == 0
    return out


def test_check_passes_on_smollm2_fp32(smollm2, smollm2_tp3pp2, capsys):
    # the shards computed through llamatron's model against transformers (tolerance 1e-4 relative)
    assert main(["check", "--hf", str(smollm2), "--mcore", str(smollm2_tp3pp2)]) == 0
    out = capsys.readouterr().out
    assert "layer 29" in out and "logits" in out and "FAIL" not in out


def test_convert_check_passes_on_smollm2_bf16(smollm2, tmp_path, capsys):
    # through `convert --check` (tolerance 5e-2 relative)
    assert main(["convert", "hf-to-mcore", "--hf", str(smollm2), "--out", str(tmp_path / "bf16"), "--tp", "3",
                 "--pp", "2", "--dtype", "bf16", "--check"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "final norm" in out and "FAIL" not in out


def test_check_fails_naming_the_corrupted_layer(smollm2, smollm2_tp3pp2, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(smollm2_tp3pp2, bad)
    # Global layer 17 is stage 1's local layer 2 (15 layers per stage); corrupt TP rank 1's part.
    path = bad / "release/mp_rank_01_001/model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        shard = torch.load(path, weights_only=True)
    weight = shard["model"]["decoder.layers.2.mlp.linear_fc2.weight"]
    shard["model"]["decoder.layers.2.mlp.linear_fc2.weight"] = weight.flip(0)
    torch.save(shard, path)
    assert main(["check", "--hf", str(smollm2), "--mcore", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "diverges from" in err and "first at layer 17 (" in err


def test_tp2_is_refused_for_smollm2(smollm2, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["convert", "hf-to-mcore", "--hf", str(smollm2), "--out", str(out), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "TP 2 must divide the 3 KV groups and 9 attention heads" in err
    assert err.count("\n") == 1 and not out.exists()


@pytest.fixture()
def tiny_hf(tmp_path):
    path = tmp_path / "hf"
    save_hf_model(build_model(tiny_config(num_layers=4, num_kv_heads=4, num_heads=4), seed=9), path,
                  dtype=torch.float32)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tp", "3"], "TP 3 must divide the 4 KV groups"),
        (["--pp", "3"], "PP 3 does not divide the 4 layers; choose a PP that divides it or give per-stage counts"),
        (["--pp", "2", "--pp-layers", "1,2"], "--pp-layers 1,2: needs 2 positive counts summing to 4 layers"),
        (["--layout", "megatron"], "unknown layout 'megatron'"),
    ],
)
def test_bad_split_arguments(tiny_hf, tmp_path, capsys, extra, message):
    out = tmp_path / "m"
    assert main(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left behind


def test_non_llama_source(tiny_hf, tmp_path, capsys):
    config = (tiny_hf / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "mistral"')
    (tiny_hf / "config.json").write_text(config.replace('"LlamaForCausalLM"', '"MistralForCausalLM"'))
    assert main(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(tmp_path / "m")]) == 2
    assert "not a Llama model (model_type='mistral')" in capsys.readouterr().err


def test_output_in_use_or_not_empty(tiny_hf, tmp_path, capsys):
    out = tmp_path / "m"
    lock = os.open(tmp_path / ".m.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as another convert writing there would hold it
    os.write(lock, b"4242")
    try:
        assert main(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out)]) == 2
        assert "is in use by another llamatron process (pid 4242" in capsys.readouterr().err
    finally:
        os.close(lock)
    assert not out.exists()
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out)]) == 2
    assert "is not empty; choose another path or pass --force" in capsys.readouterr().err
    assert main(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), "--force"]) == 0
    assert not (tmp_path / ".m.lock").exists()


def test_mcore_to_hf_needs_reference_for_check(tmp_path, capsys):
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path), "--out", str(tmp_path / "o"), "--check"]) == 2
    assert "--check needs --hf-reference" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_script_examples(smollm2, tmp_path):
    """The seed's two example commands, paths aside, on a tiny model with 8 KV groups (TP 4 valid) that
    carries SmolLM2's tokenizer files, CHECK=true (exit 1 would fail the script)."""
    hf = tmp_path / "Meta-Llama-3.1-8B"
    save_hf_model(build_model(tiny_config(num_layers=4, num_kv_heads=8, num_heads=8, hidden_size=64), seed=4), hf,
                  dtype=torch.bfloat16)
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, hf / name)
    env = subprocess_env(LLAMATRON=f"{sys.executable} -m llamatron.cli.main")
    mcore_dir, back = hf / "mcore-tp4-pp2", hf / "hf-from-mg"
    subprocess.run(["bash", str(SEED_SCRIPT), "8B", str(hf), str(mcore_dir), "4", "2", "false", "true", "false",
                    "bf16"], check=True, env=env)
    assert (mcore_dir / "release/mp_rank_03_001/model_optim_rng.pt").is_file()
    subprocess.run(["bash", str(SEED_SCRIPT), "8B", str(mcore_dir), str(back), "4", "2", "true", "true", "false",
                    "bf16", str(hf)], check=True, env=env)
    from tests.unit.checkpoint.test_convert import assert_same_hf

    assert_same_hf(hf, back)
    assert (back / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_check_on_a_tiny_model_and_a_different_model(tiny_hf, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), "--tp", "2", "--pp", "2",
                 "--layout", "mcore", "--check"]) == 0
    other = tmp_path / "other"
    save_hf_model(build_model(tiny_config(num_layers=4, num_kv_heads=4, num_heads=4, ffn_hidden_size=64), seed=9),
                  other, dtype=torch.float32)
    assert main(["check", "--hf", str(other), "--mcore", str(out)]) == 2
    assert "are different models (ffn_hidden_size 96 vs 64)" in capsys.readouterr().err
