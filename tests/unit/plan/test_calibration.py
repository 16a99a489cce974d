"""`llamatron plan`'s memory model against every peak measured on GPUs (docs/BENCHMARKS.md).

Each case is one measured figure with its model, sequence, micro batch, layout, AC, offload, card and
the command that measured it. The prediction must be within 15% of the measurement (issue 8's
acceptance); the model has no constant fitted to any of them (plan/memory.py derives every term).
Observed when written: every case within 0.5% (docs/plan.md lists them).

Figures are torch.cuda.max_memory_allocated: the trainer's peak_memory_gib, or, for the activation
checkpointing bench, the peak above the weights of one forward+backward of the plain bf16 model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llamatron.model.config import preset
from llamatron.plan.memory import (
    GIB,
    Dims,
    Layout,
    Workload,
    block_bytes,
    estimate_memory,
    final_norm_bytes,
    loss_bytes,
    stage_params,
)

TOLERANCE = 0.15


@dataclass(frozen=True)
class TrainerCase:
    name: str
    model: str
    seq_len: int
    micro_batch: int
    layout: Layout
    measured_gib: float
    card: str
    command: str
    fused_loss: bool = False
    compile: bool = False
    precision: str = "bf16"
    logits_kept: bool = False
    chunk_fp32_kept: bool = False


# The trainer's logged peak_memory_gib; each run's global batch = micro batch x GPUs (no accumulation).
# 2026-11-27: full fp32 logits (before training.fused_loss), and the trainer of then (commit 1ffc9e4)
# kept the logits in a local variable through backward (Workload.logits_kept).
# 2026-11-28 ("Speed work, one GPU"): the trainer hands the logits straight to the loss; fused loss,
# torch.compile of the blocks and torchao fp8 as each row says.
_SPEED = "bench/train_bench.py --model llama3.2-1b --seq-len 4096 --steps 15 --warmup-steps 5"
TRAINER_CASES = [
    TrainerCase(name="1b-1gpu", model="llama3.2-1b", seq_len=4096, micro_batch=2, layout=Layout(dp=1),
                measured_gib=41.6, card="H200, 2026-11-27", logits_kept=True,
                command="bench/train_bench.py --model llama3.2-1b --seq-len 4096 --micro-batch 2 --steps 15"),
    TrainerCase(name="1b-fsdp2", model="llama3.2-1b", seq_len=4096, micro_batch=2, layout=Layout(dp=2),
                measured_gib=34.7, card="2 x H200, 2026-11-27", logits_kept=True,
                command="bench/train_bench.py --model llama3.2-1b --seq-len 4096 --micro-batch 2 --nproc 2"),
    TrainerCase(name="8b-fsdp2", model="llama3.1-8b", seq_len=8192, micro_batch=1, layout=Layout(dp=2),
                measured_gib=110.3, card="2 x H200, 2026-11-27", logits_kept=True,
                command="bench/train_bench.py --model llama3.1-8b --seq-len 8192 --micro-batch 1 --nproc 2"),
    TrainerCase(name="1b-fused", model="llama3.2-1b", seq_len=4096, micro_batch=2, layout=Layout(dp=1),
                measured_gib=31.4, card="H200, 2026-11-28", fused_loss=True,
                command=f"{_SPEED} --micro-batch 2 --variants fused"),
    TrainerCase(name="1b-compile", model="llama3.2-1b", seq_len=4096, micro_batch=2, layout=Layout(dp=1),
                measured_gib=35.6, card="H200, 2026-11-28", compile=True,
                command=f"{_SPEED} --micro-batch 2 --variants compile"),
    TrainerCase(name="1b-fused-compile", model="llama3.2-1b", seq_len=4096, micro_batch=2, layout=Layout(dp=1),
                measured_gib=27.4, card="H200, 2026-11-28", fused_loss=True, compile=True, chunk_fp32_kept=True,
                command=f"{_SPEED} --micro-batch 2 --variants fused+compile"),
    TrainerCase(name="1b-fused-compile-mb4", model="llama3.2-1b", seq_len=4096, micro_batch=4, layout=Layout(dp=1),
                measured_gib=36.8, card="H200, 2026-11-28", fused_loss=True, compile=True, chunk_fp32_kept=True,
                command=f"{_SPEED} --micro-batch 4 --variants fused+compile"),
    TrainerCase(name="1b-fp8-fused-compile-mb4", model="llama3.2-1b", seq_len=4096, micro_batch=4,
                layout=Layout(dp=1), measured_gib=30.8, card="H200, 2026-11-28, torchao 0.17.0", fused_loss=True,
                compile=True, precision="fp8", chunk_fp32_kept=True,
                command=f"{_SPEED} --micro-batch 4 --variants fused+compile --precision fp8"),
    # 2026-12-04 (issue 8 (a), "Speed work, one GPU, round 2"): cuDNN attention, blocks kept gathered
    # from forward to backward (parallel.reshard_after_forward=false), micro batch 4 to 16.
    *[TrainerCase(name=f"1b-cudnn-noreshard-mb{mb}", model="llama3.2-1b", seq_len=4096, micro_batch=mb,
                  layout=Layout(dp=1, reshard_after_forward=False), measured_gib=gib, card="H200, 2026-12-04",
                  fused_loss=True, compile=True, chunk_fp32_kept=True,
                  command=f"{_SPEED} --micro-batch {mb} --variants fused+compile --extra=--parallel.attention_backend"
                          "=cudnn --extra=--parallel.reshard_after_forward=false")
      for mb, gib in ((4, 38.5), (8, 57.4), (16, 95.2))],
    TrainerCase(name="1b-fp8-cudnn-noreshard-mb16", model="llama3.2-1b", seq_len=4096, micro_batch=16,
                layout=Layout(dp=1, reshard_after_forward=False), measured_gib=71.2,
                card="H200, 2026-12-04, torchao 0.17.0", fused_loss=True, compile=True, precision="fp8",
                chunk_fp32_kept=True, command=f"{_SPEED} --micro-batch 16 --variants fused+compile --precision fp8 "
                                              "--extra=--parallel.reshard_after_forward=false"),
    # 2026-12-04, session 5 ("round 3"): the compiled fused-loss chunk no longer stores an fp32 softmax;
    # micro batch 24 with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (max_memory_allocated does not
    # depend on it).
    *[TrainerCase(name=f"1b-fusable-chunk-mb{mb}", model="llama3.2-1b", seq_len=4096, micro_batch=mb,
                  layout=Layout(dp=1, reshard_after_forward=False), measured_gib=gib, card="H200, 2026-12-04",
                  fused_loss=True, compile=True,
                  command=f"{_SPEED} --micro-batch {mb} --variants fused+compile "
                          "--extra=--parallel.reshard_after_forward=false")
      for mb, gib in ((16, 94.3), (24, 132.4))],
    # 2026-12-05, session 7 ("round 4 measured"): micro batch 10, the largest that fits an H100's 80 GB.
    TrainerCase(name="1b-fusable-chunk-mb10-h100", model="llama3.2-1b", seq_len=4096, micro_batch=10,
                layout=Layout(dp=1, reshard_after_forward=False), measured_gib=65.9, card="H100, 2026-12-05",
                fused_loss=True, compile=True,
                command="bench/train_bench.py --model llama3.2-1b --seq-len 4096 --steps 12 --warmup-steps 4 "
                        "--micro-batch 10 --variants fused+compile --extra=--parallel.reshard_after_forward=false"),
]


@pytest.mark.parametrize("case", TRAINER_CASES, ids=lambda case: case.name)
def test_trainer_peaks(case: TrainerCase):
    work = Workload(seq_len=case.seq_len, micro_batch=case.micro_batch, precision=case.precision,
                    fused_loss=case.fused_loss, compile=case.compile, microbatches=1, logits_kept=case.logits_kept,
                    chunk_fp32_kept=case.chunk_fp32_kept)
    predicted = estimate_memory(preset(case.model), case.layout, work).allocated / GIB
    assert predicted == pytest.approx(case.measured_gib, rel=TOLERANCE), (case, predicted)


# bench/ac_offload_bench.py: llama3.1-8b cut to 4 blocks, bf16 weights on one H200 (no FSDP, no
# optimizer), sequence 8192, micro batch 1; memory held after forward and the fwd+bwd peak, both above
# the weights. The loss is cross entropy of the fp32 logits after `del logits`.
# (mode, ac_layers, blocks offloaded, held GiB, peak GiB)
AC_BENCH = [
    ("none", 1, 0, 10.30, 18.13),
    ("sel", 1, 0, 7.30, 15.13),
    ("full", 1, 0, 4.42, 12.25),
    ("full", 2, 0, 4.29, 12.12),
    ("offload", 1, 1, 8.76, 16.59),
    ("offload", 4, 4, 4.16, 11.99),
]


def _plain_pass(mode: str, ac_layers: int, offloaded: int) -> tuple[float, float]:
    """(held after forward, peak) of the bench's pass: the blocks' saved activations, the final norm and
    the output layer's input, and the fp32 cross entropy of logits the bench no longer references."""
    config = preset("llama3.1-8b").replace(num_layers=4)
    d = Dims.of(config, tokens=8192, c=2)
    blocks = (config.num_layers - offloaded) * block_bytes(d, mode=mode, ac_layers=ac_layers)
    held, peak = loss_bytes(d, loss="full_logits", logits_kept=False)
    rest = blocks + final_norm_bytes(d, loss="full_logits")
    return (rest + held) / GIB, (rest + peak) / GIB


@pytest.mark.parametrize(("mode", "ac_layers", "offloaded", "held", "peak"), AC_BENCH,
                         ids=[f"{m}-{k}" for m, k, *_ in AC_BENCH])
def test_activation_checkpointing_bench(mode, ac_layers, offloaded, held, peak):
    predicted_held, predicted_peak = _plain_pass(mode, ac_layers, offloaded)
    assert predicted_held == pytest.approx(held, rel=TOLERANCE)
    assert predicted_peak == pytest.approx(peak, rel=TOLERANCE)


def test_optimizer_offload_bench():
    """bench/ac_offload_bench.py, optimizer part: the 4-block llama3.1-8b in fp32 with fused AdamW on one
    H200; static offload moved 14.3 GiB of AdamW state off the GPU."""
    config = preset("llama3.1-8b").replace(num_layers=4)
    work = Workload(seq_len=1024, fused_loss=False, microbatches=1)
    on_gpu = estimate_memory(config, Layout(), work).optimizer
    offloaded = estimate_memory(config, Layout(optimizer_offload="static"), work)
    assert offloaded.optimizer == 0
    assert (on_gpu - offloaded.optimizer) / GIB == pytest.approx(14.3, rel=TOLERANCE)
    # The same state lives in pinned host memory, with host copies of each parameter shard and gradient.
    assert offloaded.host == pytest.approx(16 * stage_params(config, Layout(), stage=0).total)
