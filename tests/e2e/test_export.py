"""A training run's checkpoint, loaded without the trainer: export to HF and Megatron-Core gives the
trained weights exactly (fp32), and eval/generate's loader reads the run directly."""

from __future__ import annotations

import pytest
import torch

from llamatron.checkpoint.dcp import load_dcp_model
from llamatron.checkpoint.hf import load_hf_model
from llamatron.checkpoint.loader import detect_format, load_model
from llamatron.checkpoint.mcore import load_mcore_model
from llamatron.cli.main import main
from tests.conftest import write_random_corpus


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    write_random_corpus(base / "corpus", seed=4, documents=120)
    code = main(["train", "--config", "tiny-debug", "--output", str(base / "run"), f"--data.data_path={base / 'corpus'}",
                 "--train-iters", "3", "--training.eval_interval=0"])
    assert code == 0
    return base / "run"


def test_run_loads_as_a_model_and_exports_exactly(run_dir, tmp_path):
    assert detect_format(run_dir) == "llamatron"
    model, tokenizer_spec = load_dcp_model(run_dir)
    assert tokenizer_spec == "llama3"
    initial = load_dcp_model(run_dir / "checkpoints" / "step-0000003")[0]
    for (name, a), (_, b) in zip(model.state_dict().items(), initial.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    assert main(["export", "--run", str(run_dir), "--to", "hf", "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    hf = load_hf_model(tmp_path / "hf")
    assert main(["export", "--run", str(run_dir), "--to", "mcore", "--out", str(tmp_path / "mcore"),
                 "--tp", "2", "--pp", "2", "--dtype", "fp32"]) == 0
    mcore = load_mcore_model(tmp_path / "mcore")
    for name, tensor in model.state_dict().items():
        assert torch.equal(hf.state_dict()[name], tensor), name
        assert torch.equal(mcore.state_dict()[name], tensor), name

    evaluated, tokenizer = load_model(run_dir)
    assert tokenizer.eos_id == 128001
    tokens = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(evaluated(tokens), model(tokens))


def test_export_refuses_a_used_output(run_dir, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert main(["export", "--run", str(run_dir), "--to", "hf", "--out", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
