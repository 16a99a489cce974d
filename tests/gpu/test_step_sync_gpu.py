"""On CUDA a training step is queued without the host waiting for the device: the loop can then stay a step
ahead and the GPU never idles at a step boundary. torch's sync debug mode raises at any synchronising call
(a boolean-mask index, unique, .item(), a copy to pageable memory) made while a step is queued."""

from __future__ import annotations

import pytest
import torch

from llamatron.cli.main import main
from llamatron.train import trainer as trainer_module
from tests.conftest import SMALL_VOCAB_EOD, SMALL_VOCAB_MODEL, write_random_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_queued_step_never_waits_for_the_device(tmp_path, monkeypatch):
    write_random_corpus(tmp_path / "corpus", seed=5, documents=120, vocab=2000, eod=SMALL_VOCAB_EOD)
    train_step = trainer_module.Trainer.train_step
    checked: list[int] = []

    def strict(self):
        if self.state.iteration < 2:  # the first steps set up state (optimizer moments, lazy inits)
            return train_step(self)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = train_step(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(step.iteration)
        return step

    monkeypatch.setattr(trainer_module.Trainer, "train_step", strict)
    code = main([
        "train", "--config", "tiny-debug", "--output", str(tmp_path / "run"), f"--data.data_path={tmp_path / 'corpus'}",
        f"--model.name={SMALL_VOCAB_MODEL}", "--train-iters", "5", "--save-interval", "100",
        "--checkpoint.save_at_end=false", "--training.eval_interval=0", "--training.device=cuda",
        "--training.precision=bf16", "--training.fused_loss=true",
    ])
    assert code == 0
    assert checked == [3, 4, 5]
