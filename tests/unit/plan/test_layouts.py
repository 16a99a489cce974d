"""plan/layouts.py and plan/extrapolate.py: which layouts are offered, the recommendation, the train
options it prints (they must parse into the trainer's config), and the extrapolation from reduced depth
(checked on a synthetic measurement with a known answer: exact up to float rounding)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llamatron.config.job import JobConfig
from llamatron.config.load import apply_overrides
from llamatron.errors import LlamatronError
from llamatron.model.config import preset
from llamatron.plan import layouts as lay
from llamatron.plan.extrapolate import Run, extrapolate, memory_residual, parse_measurement
from llamatron.plan.memory import GIB, Layout, Workload, estimate_memory
from llamatron.plan.speed import estimate_step, per_token
from llamatron.train.metrics import flops_per_token

EIGHT_B = preset("llama3.1-8b")


def test_layouts_of_8_gpus_are_the_valid_ones():
    work = Workload(seq_len=8192)
    found = lay.parallel_layouts(EIGHT_B, work, gpus=8, gpus_per_node=8)
    degrees = {(x.tp, x.pp, x.cp, x.dp) for x in found}
    for tp, pp, cp, dp in degrees:
        assert tp * pp * cp * dp == 8 and tp <= 8 and EIGHT_B.num_layers % pp == 0
    assert {(1, 1, 1, 8), (2, 1, 1, 4), (4, 2, 1, 1), (1, 1, 2, 4), (8, 1, 1, 1)} <= degrees
    # The replicated optimizer only where there is something to replicate over.
    assert all(x.dp * x.cp > 1 for x in found if not x.distributed_optimizer)
    # TP stays inside a node: with 4 GPUs per node no tp of 8.
    assert all(x.tp <= 4 for x in lay.parallel_layouts(EIGHT_B, work, gpus=8, gpus_per_node=4))


def test_layout_problems_name_each_reason():
    problems = lay.layout_problems(EIGHT_B, Layout(tp=16, cp=3, pp=5, dp=1), Workload(seq_len=1000),
                                   gpus_per_node=8, global_batch=None)
    text = " | ".join(problems)
    assert "above the model's 8 KV heads" in text and "spans nodes" in text
    assert "do not split evenly" in text and "seq_len 1000 is not divisible" in text
    assert lay.layout_problems(EIGHT_B, Layout(dp=3), Workload(seq_len=8192), gpus_per_node=8,
                               global_batch=8) == ["global batch 8 is not divisible by micro batch 1 x dp 3"]
    assert "cannot fill pp=4" in lay.layout_problems(EIGHT_B, Layout(pp=4, dp=2), Workload(seq_len=8192),
                                                     gpus_per_node=8, global_batch=4)[0]


def test_recommendation_fits_and_is_fastest_expected():
    work = Workload(seq_len=8192)
    candidates = lay.plan_layouts(EIGHT_B, work, gpus=8, gpus_per_node=8, gpu_mem_gib=80)
    best = lay.recommend(candidates)
    assert best.fits and best.memory.total <= 80 * GIB
    assert all(best.overhead <= c.overhead + 1e-9 for c in candidates if c.fits and c.runnable)
    # A tighter GPU forces memory savings onto the recommendation, never a layout that does not fit.
    small = lay.recommend(lay.plan_layouts(EIGHT_B, work, gpus=8, gpus_per_node=8, gpu_mem_gib=40))
    assert small.fits and small.memory.total <= 40 * GIB and small.overhead >= best.overhead
    assert lay.recommend(lay.plan_layouts(EIGHT_B, work, gpus=1, gpus_per_node=8, gpu_mem_gib=40)) is None
    # Layouts the trainer refuses are kept out of the recommendation while another fits.
    refused = lay.plan_layouts(EIGHT_B, work, gpus=8, gpus_per_node=8, gpu_mem_gib=80,
                               unsupported=lambda layout, w: ["parallel.cp"] if layout.cp > 1 else [])
    assert lay.recommend(refused).layout.cp == 1


def test_offload_takes_the_fewest_blocks_that_fit():
    work = Workload(seq_len=8192)
    layout = Layout(dp=8, activation_checkpoint="offload")
    chosen = lay._fewest_offloaded(EIGHT_B, layout, work, blocks=32, gpu_mem_gib=70)
    assert estimate_memory(EIGHT_B, chosen, work).total <= 70 * GIB
    fewer = replace(chosen, ac_layers=chosen.ac_layers - 1)
    assert estimate_memory(EIGHT_B, fewer, work).total > 70 * GIB


def test_train_options_parse_into_the_trainers_config():
    layout = Layout(tp=2, pp=2, cp=2, dp=1, virtual_pipeline=2, activation_checkpoint="full", ac_layers=2,
                    optimizer_offload="static", distributed_optimizer=False)
    work = Workload(seq_len=4096, micro_batch=2, precision="bf16", fused_loss=False)
    options = lay.train_options(layout, work, model="llama3.1-8b", global_batch=16)
    config = apply_overrides(JobConfig(), options)
    p, t = config.parallel, config.training
    assert (p.tp, p.pp, p.cp, p.virtual_pipeline) == (2, 2, 2, 2)
    assert (p.activation_checkpoint, p.ac_layers, p.optimizer_offload) == ("full", 2, "static")
    assert p.sequence_parallel and not p.distributed_optimizer
    assert (t.seq_len, t.micro_batch_size, t.global_batch_size) == (4096, 2, 16)
    assert getattr(t, "fused_loss", False) is False  # passed where the trainer has the option
    assert config.model.name == "llama3.1-8b"
    assert lay.launch_options(gpus=64, nodes=8)[:2] == ["--nproc-per-node=8", "--nnodes=8"]


def test_request_mistakes_are_listed_together():
    with pytest.raises(LlamatronError) as info:
        lay.check_request(EIGHT_B, Workload(seq_len=1, micro_batch=0), gpus=8, nodes=3)
    message = str(info.value)
    assert "--nodes 3 does not divide --gpus 8" in message and "--seq-len" in message and "--micro-batch" in message


def _synthetic_measurement(config, *, residual=(1.5 * GIB, 0.02 * GIB), base=2e-4, per_layer=1e-5):
    """Runs at 2 and 4 layers whose memory is the model's plus a known residual and whose time per token
    per GPU is a known line."""
    layout = Layout(dp=2, activation_checkpoint="full")
    work = Workload(seq_len=8192, microbatches=1)
    runs = []
    for layers in (2, 4):
        cut = config.replace(num_layers=layers)
        peak = estimate_memory(cut, layout, work).allocated + residual[0] + residual[1] * layers
        runs.append({"layers": layers, "peak_memory_gib": peak / GIB,
                     "tokens_per_s_per_gpu": 1.0 / (base + per_layer * layers)})
    raw = {"model": "llama3.1-70b", "gpus": 2, "seq_len": 8192, "micro_batch": 1, "global_batch": 2,
           "layout": {"activation_checkpoint": "full", "ac_layers": 1}, "runs": runs, "card": "synthetic"}
    return parse_measurement(raw, source="synthetic")


def test_extrapolation_recovers_a_known_residual_and_time_line():
    config = preset("llama3.1-70b")
    measurement = _synthetic_measurement(config)
    constant, per_layer = memory_residual(config, measurement)
    assert constant == pytest.approx(1.5 * GIB, rel=1e-6) and per_layer == pytest.approx(0.02 * GIB, rel=1e-6)
    # Same layout and GPU count at full depth: the model's prediction plus the residual, the time line at 80.
    same = extrapolate(config, measurement, gpus=2)
    expected = estimate_memory(config, same.layout, Workload(seq_len=8192, microbatches=1)).allocated
    assert same.allocated == pytest.approx(expected + 1.5 * GIB + 0.02 * GIB * 80, rel=1e-9)
    assert same.tokens_per_s_per_gpu == pytest.approx(1.0 / (2e-4 + 1e-5 * 80), rel=1e-9)
    # 64 GPUs over 8 nodes: dp grows, the FSDP shards shrink, and FSDP's traffic crosses the network: what
    # speed.py estimates for it replaces the measured layout's (each rank keeps one micro-batch per step).
    wide = extrapolate(config, measurement, gpus=64)
    assert wide.layout.dp == 64 and wide.allocated < same.allocated
    before = estimate_step(config, measurement.layout, measurement.work)
    after = estimate_step(config, wide.layout, measurement.work)
    assert after.extra_s > before.extra_s
    core = 2e-4 + 1e-5 * 80 - per_token(before.extra_s, measurement.layout, measurement.work)
    assert wide.tokens_per_s_per_gpu == pytest.approx(
        1 / (core + per_token(after.extra_s, wide.layout, measurement.work)), rel=1e-9)
    assert wide.tokens_per_s_per_gpu < same.tokens_per_s_per_gpu
    assert wide.mfu == pytest.approx(wide.tokens_per_s_per_gpu * flops_per_token(config, seq_len=8192) / 989e12)


def test_measurement_needs_two_depths_and_known_fields():
    with pytest.raises(LlamatronError, match="two or more different depths"):
        parse_measurement({"model": "8B", "gpus": 2, "seq_len": 8, "runs": [{"layers": 2}]}, source="m.json")
    with pytest.raises(LlamatronError, match="unknown layout field"):
        parse_measurement({"model": "8B", "gpus": 2, "seq_len": 8, "layout": {"tpp": 2},
                           "runs": [{"layers": 2}, {"layers": 4}]}, source="m.json")
    assert Run(layers=2, peak_memory_gib=None, tokens_per_s_per_gpu=None).layers == 2
