"""Tensor/sequence parallelism on GPUs with NCCL: one TP step equals the plain model's (logits, loss, gradients).

The CPU tests (tests/distributed/test_tp.py) run the same comparison on gloo; this runs it on CUDA
with NCCL, fp32 (TF32 off), a larger random model, packed documents and both SP settings, and writes
the largest relative errors as JSON.

    torchrun --standalone --nproc-per-node 2 bench/tp_check.py --out tp_check.json   # tp2
    torchrun --standalone --nproc-per-node 4 bench/tp_check.py --out tp_check.json   # dp2 x tp2 with FSDP2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llamatron.model.config import LlamaConfig  # noqa: E402
from llamatron.model.llama import build_model  # noqa: E402
from llamatron.parallel.tp import apply_tp, full_tensor  # noqa: E402
from llamatron.train.loss import loss_parts  # noqa: E402


def _batch(vocab: int, *, device: torch.device, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, seq), generator=generator)
    labels = torch.randint(0, vocab, (2, seq), generator=generator)
    labels[0, : seq // 4] = -100
    cut = seq // 3
    document_ids = torch.tensor([[0] * cut + [1] * (seq - cut), [0] * seq])
    positions = torch.stack([torch.cat([torch.arange(cut), torch.arange(seq - cut)]), torch.arange(seq)])
    batch = {"tokens": tokens, "labels": labels, "document_ids": document_ids, "positions": positions}
    return {k: v.to(device) for k, v in batch.items()}


def _step(model, batch: dict, *, packed: bool):
    extra = {"document_ids": batch["document_ids"], "positions": batch["positions"]} if packed else {}
    logits = model(batch["tokens"], **extra)
    numerator, count = loss_parts(logits, batch["labels"], kind="sequence" if packed else "token",
                                  document_ids=extra.get("document_ids"))
    loss = numerator / count
    loss.backward()
    return full_tensor(logits).detach(), full_tensor(loss).detach()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tp_check.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    # With 4 GPUs: dp2 x tp2 on the trainer's mesh, FSDP2 over dp (sharded and replicated) on top of TP.
    # Every dp rank gets the same batch, so FSDP's averaged gradient equals the plain model's.
    fsdp_modes = (True, False) if world == 4 else (None,)
    if world == 4:
        from llamatron.parallel.mesh import ParallelDims, build_mesh

        job_mesh = build_mesh(ParallelDims(world_size=world, tp=2), device_type="cuda")
        mesh = job_mesh["tp"]
    else:
        mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("tp",))
    config = LlamaConfig(vocab_size=32000, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=4,
                         ffn_hidden_size=1408, max_position_embeddings=4096)
    results = []
    cases = [(sp, packed, shard) for sp in (True, False) for packed in (False, True) for shard in fsdp_modes]
    for sequence_parallel, packed, shard in cases:
        plain = build_model(config, device=device, seed=3)
        parallel = copy.deepcopy(plain)
        apply_tp(parallel, mesh, sequence_parallel=sequence_parallel, loss_parallel=True)
        if shard is not None:
            from llamatron.parallel.fsdp import apply_fsdp

            apply_fsdp(parallel, job_mesh["dp"], param_dtype=torch.float32, shard=shard)
        batch = _batch(config.vocab_size, device=device, seq=256)
        want_logits, want_loss = _step(plain, batch, packed=packed)
        got_logits, got_loss = _step(parallel, batch, packed=packed)
        grads = dict(parallel.named_parameters())
        grad_errors = {name: _rel(full_tensor(grads[name].grad), p.grad) for name, p in plain.named_parameters()}
        worst = max(grad_errors, key=grad_errors.get)
        want_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e9)
        got_norm = full_tensor(torch.nn.utils.clip_grad_norm_(parallel.parameters(), 1e9))
        results.append({
            "sequence_parallel": sequence_parallel, "packed": packed, "fsdp_shard": shard,
            "grad_norm_rel": _rel(got_norm, want_norm),
            "logits_rel": _rel(got_logits, want_logits), "loss_rel": _rel(got_loss, want_loss),
            "grad_rel_max": grad_errors[worst], "grad_rel_worst_param": worst,
        })
    if dist.get_rank() == 0:
        report = {"device": torch.cuda.get_device_name(device), "world_size": world, "torch": torch.__version__,
                  "results": results}
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
