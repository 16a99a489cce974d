"""AC modes and optimizer offload under FSDP2 on GPUs with NCCL: the same losses as the plain run.

    PYTHONPATH=src torchrun --nproc-per-node 2 bench/ac_offload_fsdp_check.py --json ac-fsdp.json

A small Llama (fp32, 4 blocks) is trained 6 steps per setting with FSDP2 over all ranks and fused AdamW;
losses are compared with the plain run (max relative difference), and for optimizer offload the state's
device and a get/set_optimizer_state_dict round trip (what DCP checkpoints use) are checked.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh

SETTINGS = {
    "plain": ("none", 1, "none"),
    "sel": ("sel", 1, "none"),
    "full-k2": ("full", 2, "none"),
    "offload-k2": ("offload", 2, "none"),
    "opt-static": ("none", 1, "static"),
    "opt-auto": ("none", 1, "auto"),
    "full-k1+static": ("full", 1, "static"),
}


def run(setting: tuple[str, int, str], mesh, device) -> dict:
    from llamatron.config.job import OptimSection
    from llamatron.model import LlamaConfig, build_model
    from llamatron.parallel.ac import apply_ac
    from llamatron.parallel.fsdp import apply_fsdp
    from llamatron.parallel.offload import offload_optimizer
    from llamatron.train.optim import build_optimizer

    ac, k, opt_mode = setting
    config = LlamaConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                         ffn_hidden_size=512, max_position_embeddings=2048)
    model = build_model(config, device=device, seed=5)
    apply_ac(model, mode=ac, layers=k)
    apply_fsdp(model, mesh, param_dtype=torch.float32)
    optimizer = offload_optimizer(build_optimizer(model, OptimSection(lr=1e-3), fused=True), mode=opt_mode,
                                  device=device)
    losses = []
    for step in range(6):
        gen = torch.Generator(device).manual_seed(100 * step + dist.get_rank())
        tokens = torch.randint(0, 1024, (2, 513), device=device, generator=gen)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
    info = {"losses": losses}
    if opt_mode != "none":
        state = get_optimizer_state_dict(model, optimizer)
        set_optimizer_state_dict(model, optimizer, state)
        devices = {v.to_local().device.type if hasattr(v, "to_local") else v.device.type
                   for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
        info["state_devices_after_reload"] = sorted(devices)
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    results = {name: run(setting, mesh, device) for name, setting in SETTINGS.items()}
    plain = results["plain"]["losses"]
    for info in results.values():
        info["max_rel_diff_vs_plain"] = max(abs(a - b) / abs(b) for a, b in zip(info["losses"], plain, strict=True))
    if dist.get_rank() == 0:
        summary = {"card": torch.cuda.get_device_name(), "world_size": dist.get_world_size(),
                   "torch": torch.__version__, "results": results}
        print(json.dumps(summary, indent=1))
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
