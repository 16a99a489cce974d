"""The attention core's forward + backward time per SDPA backend, eager and under torch.compile, and the
aten op that actually ran in each (a compiled graph picks its kernel when it is traced, which need not be
the kernel eager mode picks under the same flags).

    python bench/attention_bench.py --batch 4 --heads 32 --kv-heads 8 --seq 4096 --head-dim 64 --out attn.json

FLOPs: causal attention, forward 2 * 2 * B * H * T^2 * d / 2 (the two matmuls over the lower triangle),
backward 2.5x forward; the rate is of real (not the MFU convention's full-square) FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def time_backend(order: list[str], *, compiled: bool, where: str, shape: dict, iters: int) -> dict:
    """where: "core" (the model's way: the attention core carries the choice, applied inside its call) or
    "outside" (an sdpa_kernel context around the calls, which a compiled graph does not see)."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    from llamatron.model.llama import SDPAttention
    from llamatron.parallel.attention_backend import _SDP, sdpa_ops

    b, h, kv, t, d = (shape[k] for k in ("batch", "heads", "kv_heads", "seq", "head_dim"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    grad_out = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    backends = [_SDP[name] for name in order]
    core = SDPAttention(backends=backends if where == "core" else None)
    outside = sdpa_kernel(backends, set_priority=len(backends) > 1) if where == "outside" else nullcontext()

    def attend(q, k, v):
        return core(q, k, v, mask=None)

    if compiled:
        torch._dynamo.reset()
        attend = torch.compile(attend, fullgraph=True)

    def step():
        out = attend(q, k, v)
        out.backward(grad_out)

    with outside:
        try:
            for _ in range(3):
                step()
        except RuntimeError as err:
            return {"order": order, "compiled": compiled, "where": where, "error": str(err).splitlines()[0][:200]}
        ops = sorted(set(sdpa_ops(step)))
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    flops = 2 * 2 * b * h * t * t * d / 2 * 3.5
    return {"order": order, "compiled": compiled, "where": where, "ops": ops, "fwd_bwd_ms": seconds * 1e3,
            "tflops": flops / seconds / 1e12}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--orders", default="flash;cudnn;efficient;flash,efficient,math,cudnn;cudnn,efficient,math",
                        help="backend orders to try, ';'-separated, each a ','-separated priority list")
    parser.add_argument("--where", default="core,outside", help="core, outside or both (see time_backend)")
    parser.add_argument("--out", default="attention_bench.json")
    args = parser.parse_args()
    shape = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "seq": args.seq,
             "head_dim": args.head_dim}
    rows = []
    for order_text in args.orders.split(";"):
        order = order_text.split(",")
        for where, compiled in [(w, c) for w in args.where.split(",") for c in (False, True)]:
            started = time.perf_counter()
            row = time_backend(order, compiled=compiled, where=where, shape=shape, iters=args.iters)
            row["wall_s"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"shape": shape, "torch": torch.__version__,
                                          "cudnn": torch.backends.cudnn.version(),
                                          "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("| order | choice applied | compiled | forward op | fwd+bwd ms | TFLOP/s |\n|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {','.join(r['order'])} | {r['where']} | {r['compiled']} |"
        if "error" in r:
            print(f"{head} error: {r['error']} | - | - |")
        else:
            forward = [op for op in r["ops"] if "backward" not in op and "_scaled_dot_product" in op]
            print(f"{head} {' '.join(forward)} | {r['fwd_bwd_ms']:.2f} | {r['tflops']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
