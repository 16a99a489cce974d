"""HF transformers' training speed on the same shape, for a side-by-side with bench/train_bench.py.

LlamaForCausalLM built from llamatron's preset (random init), fp32 master weights, bf16 autocast, SDPA
attention, fused AdamW, random tokens; the same FLOP convention as the trainer (6 N + 12 L H d T).
--grad-accum K runs K micro-batches per optimizer step (the loss divided by K, as HF's Trainer does), so
both stacks can be compared at the same global batch.
    python bench/hf_train_baseline.py --model llama3.2-1b --seq-len 4096 --micro-batch 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--out", default="hf_train_baseline.json")
    args = parser.parse_args()

    import transformers

    from llamatron.model import preset, to_hf_config
    from llamatron.train.metrics import device_peak_tflops, flops_per_token

    config = preset(args.model)
    device = torch.device("cuda")
    hf_config = transformers.LlamaConfig(**to_hf_config(config, torch_dtype="float32"))
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    losses = []
    for step in range(args.steps):
        batches = [torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), device=device,
                                 generator=generator) for _ in range(args.grad_accum)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        step_loss = 0.0
        for tokens in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])  # HF shifts labels itself
            (out.loss / args.grad_accum).backward()
            step_loss += out.loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"step {step + 1}: loss {losses[-1]:.4f} {times[-1] * 1000:.0f} ms", flush=True)
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    tps = tokens_per_step / statistics.mean(times[args.warmup_steps :])
    peak = device_peak_tflops(device)
    result = {
        "stack": f"transformers {transformers.__version__}", "model": args.model, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "tokens_per_s_per_gpu": tps,
        "mfu": tps * flops_per_token(config, seq_len=args.seq_len) / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
