"""The fused loss's per-chunk softmax and gradient, compiled, in its two spellings: in place on one fp32
buffer (the eager path's function) against the compiler-friendly one (train/fused_loss.py says why), on
a chunk of Llama 3's vocabulary; CUDA events over repeated calls, and the peak memory each adds.
    python bench/fused_loss_bench.py --tokens 2048 --vocab 128256 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def time_fn(fn, args: tuple, *, repeats: int) -> tuple[float, float]:
    """Mean milliseconds a call, and GiB of memory the call allocates above what was live before it."""
    for _ in range(3):  # compile and warm up
        fn(*args, grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*args, grad=True)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="fused_loss_bench.json")
    args = parser.parse_args()
    from llamatron.train.fused_loss import _chunk_loss_and_grad, _chunk_loss_and_grad_fusable

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab, device="cuda", generator=g).mul_(3).bfloat16()
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=g)
    weights = torch.rand(args.tokens, device="cuda", generator=g)
    rows = {}
    for name, fn in (("in_place", _chunk_loss_and_grad), ("fusable", _chunk_loss_and_grad_fusable)):
        ms, gib = time_fn(torch.compile(fn), (logits, targets, weights), repeats=args.repeats)
        moved = logits.numel() * logits.element_size() * 3 / 1e9  # the minimum: two reads and one write
        rows[name] = {"ms": ms, "extra_peak_gib": gib, "effective_tb_s_at_3_passes": moved / ms}
        print(f"{name:9s} {ms:7.3f} ms  +{gib:5.2f} GiB  ({moved / ms:4.2f} TB/s if 3 bf16 passes)", flush=True)
    a, b = (torch.compile(f)(logits, targets, weights, grad=True)
            for f in (_chunk_loss_and_grad, _chunk_loss_and_grad_fusable))
    rows["loss_rel_diff"] = float((a[0] - b[0]).abs() / a[0].abs())
    rows["grad_max_abs_diff"] = float((a[1].float() - b[1].float()).abs().max())
    print(json.dumps(rows, indent=1))
    with open(args.out, "w") as f:
        json.dump({"tokens": args.tokens, "vocab": args.vocab, "device": torch.cuda.get_device_name(), **rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
