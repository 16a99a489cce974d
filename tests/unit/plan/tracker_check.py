"""Peak memory of real training steps on CPU, measured by torch's FSDPMemTracker (test_tracker.py).

The trainer's own pieces (the plain model, apply_tp, apply_cp, apply_ac, apply_fsdp, its optimizer and
its loss functions) run one optimizer step over a fake 4-rank process group: collectives do nothing, every tensor
is real, and the tracker records the live bytes of every storage (rounded to 512 B as the CUDA caching
allocator does) at each point of forward, backward and the step, so its peak is what
torch.cuda.max_memory_allocated would report for one rank. Prints one JSON object: scenario -> peak bytes.

    python tests/unit/plan/tracker_check.py [scenario ...]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial

WORLD = 4


@dataclass(frozen=True)
class Scenario:
    dp: int
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = True
    mode: str = "none"
    vocab: int = 4096
    fused_chunk: int | None = None
    """None: the plain loss of full logits; else the fused loss with this chunk."""
    microbatches: int = 1
    distributed_optimizer: bool = True
    layers: int = 4
    tokens: int = 256


SCENARIOS = {
    "fsdp4-none-logits": Scenario(dp=4),
    "fsdp4-sel-fused-accumulating": Scenario(dp=4, mode="sel", fused_chunk=64, microbatches=2),
    "fsdp4-full-small-vocab": Scenario(dp=4, mode="full", vocab=256),
    "tp2-sp-fsdp2-none": Scenario(dp=2, tp=2),
    "tp2-fsdp2-full-no-sp": Scenario(dp=2, tp=2, sequence_parallel=False, mode="full"),
    "replicated4-none-small-vocab": Scenario(dp=4, vocab=256, distributed_optimizer=False),
    "cp2-fsdp2-none-logits": Scenario(dp=2, cp=2),
    "cp2-fsdp2-sel-small-vocab": Scenario(dp=2, cp=2, mode="sel", vocab=256),
}


def model_config(scenario: Scenario):
    from llamatron.model.config import preset

    return preset("tiny").replace(num_layers=scenario.layers, hidden_size=128, num_heads=4, num_kv_heads=2,
                                  ffn_hidden_size=384, vocab_size=scenario.vocab)


def measure(scenario: Scenario) -> int:
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from llamatron.config.job import OptimSection
    from llamatron.model import build_model
    from llamatron.parallel.ac import apply_ac
    from llamatron.parallel.cp import apply_cp, shard_batch
    from llamatron.parallel.fsdp import apply_fsdp
    from llamatron.parallel.mesh import ParallelDims, build_mesh, fsdp_mesh
    from llamatron.parallel.tp import apply_tp
    from llamatron.train.loss import loss_parts
    from llamatron.train.optim import build_optimizer

    torch.manual_seed(0)
    config = model_config(scenario)
    mesh = build_mesh(ParallelDims(world_size=WORLD, tp=scenario.tp, cp=scenario.cp), device_type="cpu")
    model = build_model(config, dtype=torch.float32)
    apply_tp(model, mesh["tp"], sequence_parallel=scenario.sequence_parallel, loss_parallel=True)
    apply_cp(model, mesh["cp"])
    apply_ac(model, mode=scenario.mode, layers=1)
    apply_fsdp(model, fsdp_mesh(mesh), param_dtype=torch.bfloat16, shard=scenario.distributed_optimizer)
    optimizer = build_optimizer(model, OptimSection())
    tokens = torch.randint(0, config.vocab_size, (1, scenario.tokens + 1), generator=torch.Generator().manual_seed(0))
    # This rank's zigzag slice under CP (with the real positions), the whole sequence otherwise.
    batch = shard_batch({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}, cp_rank=0, cp_size=scenario.cp)

    def micro_batch() -> None:
        if scenario.fused_chunk is None:
            logits = model(batch["tokens"], positions=batch.get("positions"))
            numerator, _ = loss_parts(logits, batch["labels"], kind="token")
            del logits
        else:
            from llamatron.train.fused_loss import fused_loss_parts

            output_fn = partial(fused_loss_parts, labels=batch["labels"], kind="token", chunk_size=scenario.fused_chunk)
            numerator, _ = model(batch["tokens"], positions=batch.get("positions"), output_fn=output_fn)
        (numerator / scenario.tokens).backward()

    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs((tokens,))
    with tracker:
        for _ in range(2):  # the second step runs with the optimizer state allocated
            for _ in range(scenario.microbatches):
                micro_batch()
                tracker.reset_mod_stats()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def fused_loss_available() -> bool:
    """train/fused_loss.py and the model's output_fn (the fused loss's hook) are installed."""
    import importlib.util
    import inspect

    from llamatron.model.llama import Llama

    return (importlib.util.find_spec("llamatron.train.fused_loss") is not None
            and "output_fn" in inspect.signature(Llama.forward).parameters)


def main(names: list[str]) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    fused = fused_loss_available()
    dist.init_process_group("fake", rank=0, world_size=WORLD, store=FakeStore())
    try:
        # null: the scenario needs the fused loss, which this checkout does not have.
        print(json.dumps({name: measure(SCENARIOS[name]) if fused or SCENARIOS[name].fused_chunk is None else None
                          for name in names or SCENARIOS}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
