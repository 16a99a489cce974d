"""Tensor (and sequence) parallelism on 2 gloo processes against the plain model in one process.

One forward and backward of the TP model gives the plain model's logits, loss and gradients
(gathered). Tolerance: fp32 on CPU; the row-parallel matmuls and the vocabulary-parallel softmax sum
in another order, so values agree to 1e-5 relative (measured ~1e-7), with an absolute floor of 1e-6
for near-zero gradient entries."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamatron.model.llama import build_model
from llamatron.parallel.tp import apply_tp, full_tensor, tp_problems
from llamatron.train.loss import loss_parts
from tests.conftest import tiny_config

RTOL, ATOL = 1e-5, 1e-6
CASES = [  # (sequence_parallel, loss_parallel, tied embeddings, packed documents)
    (True, True, False, False),
    (True, True, False, True),
    (False, True, True, True),
    (False, False, False, False),
    (True, False, True, False),
]


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 12), generator=generator)
    labels = torch.randint(0, vocab, (2, 12), generator=generator)
    labels[0, :3] = -100  # a masked prompt
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, 12).clone()
    positions[1] = torch.arange(12)
    return {"tokens": tokens, "labels": labels, "document_ids": document_ids, "positions": positions}


def _step(model, batch: dict, *, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    extra = {"document_ids": batch["document_ids"], "positions": batch["positions"]} if packed else {}
    logits = model(batch["tokens"], **extra)
    numerator, count = loss_parts(logits, batch["labels"], kind="sequence" if packed else "token",
                                  document_ids=extra.get("document_ids"))
    loss = numerator / count
    loss.backward()
    return full_tensor(logits).detach(), loss.detach()


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for sequence_parallel, loss_parallel, tied, packed in CASES:
            config = tiny_config(tie_word_embeddings=tied)
            assert tp_problems(config, world) == []
            plain = build_model(config, seed=7)
            parallel = copy.deepcopy(plain)
            apply_tp(parallel, mesh, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
            batch = _batch(config.vocab_size)
            want_logits, want_loss = _step(plain, batch, packed=packed)
            got_logits, got_loss = _step(parallel, batch, packed=packed)
            case = f"sp={sequence_parallel} loss_parallel={loss_parallel} tied={tied} packed={packed}"
            torch.testing.assert_close(got_logits, want_logits, rtol=RTOL, atol=ATOL, msg=case)
            torch.testing.assert_close(full_tensor(got_loss), want_loss, rtol=RTOL, atol=0.0, msg=case)
            grads = dict(parallel.named_parameters())
            for name, param in plain.named_parameters():
                got = full_tensor(grads[name].grad)
                torch.testing.assert_close(got, param.grad, rtol=RTOL, atol=ATOL, msg=f"{case}: {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp_logits_loss_and_gradients_equal_the_plain_model():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
