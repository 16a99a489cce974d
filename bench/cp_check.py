"""Ring attention (context parallelism) on GPUs with NCCL: equal to whole-sequence attention, and its speed.

The CPU tests (tests/unit/parallel/test_ring_attention.py) compare the ring with the plain model's
attention on gloo in fp32; this runs the same comparison on CUDA with NCCL, in fp32 (TF32 off; the math
block kernel) and bf16 (the CUDA flash kernel for blocks without a document mask), causal and with
packed documents, at Llama 3.1 8B's attention shape (32 heads, 8 KV heads, head dim 128). For each case
it prints and writes (JSON) the relative error of the output and of dq, dk, dv against fp32
whole-sequence SDPA, next to the error of bf16 whole-sequence SDPA itself, and the forward+backward
time of the ring per rank against whole-sequence SDPA on one GPU.

    torchrun --standalone --nproc-per-node 2 bench/cp_check.py --out cp_check.json
    torchrun --standalone --nproc-per-node 2 bench/cp_check.py --device cpu --seq 64 --heads 4 --kv-heads 2 \
        --head-dim 16 --iters 1   # the logic at tiny scale on CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llamatron.model.llama import SDPAttention, _attention_mask  # noqa: E402
from llamatron.parallel.cp import zigzag_indices  # noqa: E402
from llamatron.parallel.ring_attention import ring_attention  # noqa: E402


def _inputs(args, *, device: torch.device, packed: bool):
    generator = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (1, args.heads, args.seq, args.head_dim), (1, args.kv_heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(s, generator=generator) for s in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, generator=generator)
    documents = None
    if packed:  # documents of a few lengths, as packed SFT rows
        lengths, ids, doc = [args.seq // 5, args.seq // 3, args.seq // 7], [], 0
        for length in lengths:
            ids += [doc] * length
            doc += 1
        documents = torch.tensor(ids + [doc] * (args.seq - len(ids)))[None]
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (q, k, v, grad_out)], move(documents)


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _time(fn, tensors, grad_out, *, iters: int, device: torch.device) -> float:
    for _ in range(2):
        _grads(fn, tensors, grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        _grads(fn, tensors, grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="cp_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    group = dist.new_group(list(range(world)))
    index = zigzag_indices(args.seq, cp_rank=rank, cp_size=world, device=device)
    core = SDPAttention()
    rows = []
    for packed in (False, True):
        (q, k, v, grad_out), documents = _inputs(args, device=device, packed=packed)
        mask = _attention_mask(documents, start=0, seq=args.seq, device=device, cached=False)
        whole = partial(core, mask=mask)
        reference = _grads(whole, (q, k, v), grad_out)  # fp32, whole sequence
        local_docs = None if documents is None else documents[:, index]
        for dtype in (torch.float32, torch.bfloat16):
            tensors = [t.to(dtype) for t in (q, k, v)]
            local = [t[:, :, index] for t in tensors]
            ring = partial(ring_attention, group=group, document_ids=local_docs)
            got = _grads(ring, local, grad_out[:, :, index].to(dtype))
            plain = _grads(whole, tensors, grad_out.to(dtype))
            row = {"packed": packed, "dtype": str(dtype).removeprefix("torch."), "cp": world, "seq": args.seq}
            for name, mine, whole_seq, want in zip(("out", "dq", "dk", "dv"), got, plain, reference, strict=True):
                row[f"ring_{name}_rel"] = _rel(mine, want[:, :, index])
                row[f"sdpa_{name}_rel"] = _rel(whole_seq, want)
            row["ring_ms"] = _time(ring, local, grad_out[:, :, index].to(dtype), iters=args.iters, device=device)
            row["sdpa_whole_seq_ms"] = _time(whole, tensors, grad_out.to(dtype), iters=args.iters, device=device)
            rows.append(row)
    if rank == 0:
        header = f"{'case':<18} {'out ring/sdpa':>19} {'dq ring/sdpa':>19} {'dk ring/sdpa':>19} {'dv ring/sdpa':>19} " \
                 f"{'ring ms':>8} {'whole ms':>8}"
        print(header)
        for r in rows:
            case = f"{r['dtype']} {'packed' if r['packed'] else 'causal'}"
            cells = [f"{r[f'ring_{n}_rel']:.1e}/{r[f'sdpa_{n}_rel']:.1e}" for n in ("out", "dq", "dk", "dv")]
            print(f"{case:<18} " + " ".join(f"{c:>19}" for c in cells) + f" {r['ring_ms']:8.2f} {r['sdpa_whole_seq_ms']:8.2f}")
        meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                "world": world, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
