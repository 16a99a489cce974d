"""Activation checkpointing / offload and optimizer offload on one GPU: memory saved, time, equality.

    PYTHONPATH=src python bench/ac_offload_bench.py --json ac-offload.json [--layers 4 --seq 8192]

Activations: the llama3.1-8b architecture cut to --layers blocks (activation memory is per block, so a
few blocks show it), bf16 weights, micro batch 1, sequence --seq. For each AC mode it reports the memory
held after forward and the peak over forward+backward (both above the weights), the fwd+bwd time, and
the largest gradient difference to the plain model (also in fp32 at sequence 1024) (the CUDA paths: side-stream copies to pinned
memory, recomputation).

Optimizer: the same cut model in fp32 with AdamW (fused), plain vs static vs auto offload: GPU memory
held after the first step (the state), step time, and the largest parameter difference after 3 steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _build(layers: int, *, dtype: torch.dtype, seed: int = 1234):
    from llamatron.model import build_model, preset

    config = preset("llama3.1-8b").replace(num_layers=layers)
    return build_model(config, device="cuda", dtype=dtype, seed=seed)


def _fwd_bwd(model, tokens) -> tuple[float, int, int]:
    """(seconds, bytes held after forward, peak bytes), both above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    del logits
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start, held, torch.cuda.max_memory_allocated() - base


def bench_ac(*, layers: int, seq: int, dtype: torch.dtype) -> list[dict]:
    from llamatron.parallel.ac import apply_ac

    tokens = torch.randint(0, 128256, (1, seq + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    # "none" twice: the second shows the run-to-run noise of the GPU kernels (atomics in backward).
    settings = [("none", 1), ("none", 1), ("sel", 1), ("full", 1), ("full", 2), ("offload", 1), ("offload", layers)]
    reference, rows = None, []
    for mode, k in settings:
        model = _build(layers, dtype=dtype)
        apply_ac(model, mode=mode, layers=k)
        _fwd_bwd(model, tokens)  # warm-up (allocator, kernels, pinned pool)
        model.zero_grad(set_to_none=True)
        seconds, held, peak = _fwd_bwd(model, tokens)
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        if reference is None:
            reference = grads
        diff = max(float((grads[n] - reference[n]).abs().max() / reference[n].abs().max().clamp_min(1e-30))
                   for n in reference)
        rows.append({"mode": mode, "ac_layers": k, "held_after_forward_gib": held / 2**30,
                     "peak_fwd_bwd_gib": peak / 2**30, "fwd_bwd_s": seconds, "max_grad_rel_diff": diff})
        print(json.dumps(rows[-1]), flush=True)
        del model, grads
        torch.cuda.empty_cache()
    return rows


def bench_optimizer(*, layers: int, seq: int) -> list[dict]:
    from llamatron.config.job import OptimSection
    from llamatron.parallel.offload import offload_optimizer
    from llamatron.train.optim import build_optimizer

    tokens = torch.randint(0, 128256, (1, seq + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference, rows = None, []
    for mode in ("none", "static", "auto"):
        model = _build(layers, dtype=torch.float32)
        optimizer = offload_optimizer(build_optimizer(model, OptimSection(lr=1e-4), fused=True), mode=mode,
                                      device=torch.device("cuda"))
        offloaded = sum(getattr(optimizer, "is_offloaded", lambda p: False)(p)
                        for g in optimizer.param_groups for p in g["params"])
        times = []
        for step in range(3):
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            del logits
            torch.cuda.synchronize()
            before_step = torch.cuda.memory_allocated()
            start = time.perf_counter()
            optimizer.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if step == 0:
                state_gib = (torch.cuda.memory_allocated() - before_step) / 2**30
            optimizer.zero_grad(set_to_none=True)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        if reference is None:
            reference = params
        diff = max(float((params[n] - reference[n]).abs().max()) for n in reference)
        rows.append({"mode": mode, "offloaded_tensors": int(offloaded),
                     "tensors": sum(len(g["params"]) for g in optimizer.param_groups),
                     "gpu_state_after_first_step_gib": state_gib, "step_s": times[-1], "max_param_abs_diff": diff})
        print(json.dumps(rows[-1]), flush=True)
        del model, optimizer, params
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--optimizer-seq", type=int, default=1024)
    args = parser.parse_args()
    result = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "model": f"llama3.1-8b cut to {args.layers} blocks", "seq": args.seq,
        "activation_checkpointing": bench_ac(layers=args.layers, seq=args.seq, dtype=torch.bfloat16),
        "activation_checkpointing_fp32_seq1024": bench_ac(layers=args.layers, seq=1024, dtype=torch.float32),
        "optimizer_offload": bench_optimizer(layers=args.layers, seq=args.optimizer_seq),
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
