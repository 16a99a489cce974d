"""plan/memory.py: the per-op activation accounting against the tensors the real model saves, and the
model's structure (parameter counts, pipeline schedule, what each option removes).

The saved-tensor checks run the real forward (bf16, CPU) under torch.autograd.graph.saved_tensors_hooks
and count every distinct storage saved for backward that is not a parameter: exact for a block; the
loss path within 2% (nll_loss and boolean indexing also save small int64 index tensors, O(T))."""

from __future__ import annotations

import pytest
import torch

from llamatron.model import build_model
from llamatron.model.config import preset
from llamatron.plan.memory import (
    Dims,
    Layout,
    Workload,
    block_bytes,
    chunks_in_flight,
    estimate_memory,
    final_norm_bytes,
    fused_loss_chunk,
    loss_bytes,
    stage_params,
)
from llamatron.train.loss import loss_parts
from tests.conftest import tiny_config


class SavedBytes:
    """Bytes of distinct non-parameter storages saved for backward, attributed to the region active when
    first saved (a block index, or "head" after the last block)."""

    def __init__(self, model) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.by_region: dict[object, int] = {}
        self.region: object = "embedding"

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.by_region[self.region] = self.by_region.get(self.region, 0) + storage.nbytes()
        return tensor


def _run(config, tokens: int, *, prepare=None):
    model = build_model(config, dtype=torch.bfloat16, seed=0)
    if prepare is not None:
        model = prepare(model)
    counter = SavedBytes(model)
    for index, block in enumerate(model.layers.values()):
        block.register_forward_pre_hook(lambda _m, _a, index=index: setattr(counter, "region", index))
    model.layers[str(config.num_layers - 1)].register_forward_hook(
        lambda *_: setattr(counter, "region", "head"))
    ids = torch.randint(0, config.vocab_size, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        logits = model(ids[:, :-1])
        numerator, _ = loss_parts(logits, ids[:, 1:], kind="token")
    return counter.by_region, numerator


@pytest.mark.parametrize("gqa", [True, False])
def test_block_saves_what_the_model_derives(gqa):
    config = tiny_config(num_layers=3, vocab_size=512, num_kv_heads=2 if gqa else 4, ffn_hidden_size=160)
    saved, _ = _run(config, tokens=96)
    expected = block_bytes(Dims.of(config, tokens=96, c=2))
    # Block 0 also saves RoPE's cos/sin, which every later block shares; later blocks are exactly the formula.
    assert saved[1] == expected
    assert saved[2] == expected
    rope = 2 * 96 * config.dim_per_head * 2
    assert saved[0] == expected + rope


@pytest.mark.slow
@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_block_saves_what_the_model_derives(fp8):
    """training.compile: what AOTAutograd's min-cut partitioner keeps (the backend that partitions as
    inductor does, without generating code), bf16 and torchao fp8 (emulated casts). Exact, but for fp8's
    0-dim scale tensors."""
    if fp8:
        pytest.importorskip("torchao")
    from llamatron.parallel.compile import apply_compile

    def prepare(model):
        if fp8:
            from llamatron.parallel.fp8 import apply_fp8

            model.float()
            apply_fp8(model, device=torch.device("cpu"), emulate=True)
            model.to(torch.bfloat16)
        apply_compile(model, backend="aot_eager_decomp_partition")
        return model

    config = tiny_config(num_layers=3, hidden_size=128, num_heads=8, num_kv_heads=2, ffn_hidden_size=256,
                         vocab_size=512)
    saved, _ = _run(config, tokens=64, prepare=prepare)
    d = Dims.of(config, tokens=64, c=2)
    # Besides the formula's tensors fp8 saves torchao's per-tensor scales: a few 0-dim tensors.
    assert 0 <= saved[1] - block_bytes(d, compiled=True, fp8=fp8) <= (32 if fp8 else 0)
    assert block_bytes(d, compiled=True, fp8=fp8) < block_bytes(d)


def test_head_and_loss_save_what_the_model_derives():
    config = tiny_config(num_layers=2, vocab_size=2048)
    saved, numerator = _run(config, tokens=128)
    d = Dims.of(config, tokens=128, c=2)
    held, _ = loss_bytes(d, loss="full_logits")  # saved tensors: the logits themselves are not saved
    assert saved["head"] == pytest.approx(final_norm_bytes(d, loss="full_logits") + held, rel=0.02)
    assert numerator.dtype == torch.float32


def test_fused_chunk_matches_the_trainer():
    fused_loss = pytest.importorskip("llamatron.train.fused_loss")
    for vocab in (128256, 32000, 256, 4096):
        assert fused_loss_chunk(vocab) == fused_loss.default_chunk_size(vocab)


def test_parameter_counts_add_up():
    for name in ("llama3.1-8b", "llama3.1-70b", "llama3.2-1b"):
        config = preset(name)
        assert stage_params(config, Layout(), stage=0).total == config.num_params()
        # Over pipeline stages: every block once; a tied output layer gets its own copy on the last stage.
        layout = Layout(pp=4)
        total = sum(stage_params(config, layout, stage=s).total for s in range(4))
        tied_copy = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
        assert total == config.num_params() + tied_copy
        # TP splits everything but the norms.
        tp = stage_params(config, Layout(tp=8), stage=0)
        norms = (2 * config.num_layers + 1) * config.hidden_size
        assert tp.total == (config.num_params() - norms) // 8 + norms


def test_pipeline_in_flight():
    # 1F1B: stage r holds pp - r micro-batches; capped by the micro-batches of a step.
    assert [chunks_in_flight(Layout(pp=4), stage=s, microbatches=None) for s in range(4)] == [4, 3, 2, 1]
    assert chunks_in_flight(Layout(pp=4), stage=0, microbatches=2) == 2
    # Interleaved (v=2): (v-1) pp + 2 (pp - 1 - r) + 1 chunk forwards on rank r.
    assert [chunks_in_flight(Layout(pp=4, virtual_pipeline=2), stage=s, microbatches=None) for s in range(4)] == [
        11, 9, 7, 5]


def test_each_option_removes_what_it_should():
    config = preset("llama3.1-8b")
    work = Workload(seq_len=8192, fused_loss=False, microbatches=1)
    base = estimate_memory(config, Layout(dp=8), work)
    sel = estimate_memory(config, Layout(dp=8, activation_checkpoint="sel"), work)
    full = estimate_memory(config, Layout(dp=8, activation_checkpoint="full"), work)
    assert base.activations > sel.activations > full.activations
    # Sharding: the distributed optimizer divides the fp32 state by dp, replication keeps it whole.
    replicated = estimate_memory(config, Layout(dp=8, distributed_optimizer=False), work)
    assert replicated.params == pytest.approx(8 * base.params)
    assert estimate_memory(config, Layout(dp=8, optimizer_offload="static"), work).optimizer == 0
    # TP with sequence parallelism divides all but the gathered linear inputs; CP divides the sequence.
    d1 = Dims.of(config, tokens=8192, c=2)
    d4 = Dims.of(config, tokens=8192, tp=4, sequence_parallel=True, c=2)
    assert block_bytes(d4) == pytest.approx(block_bytes(d1) / 4 + 2 * 2 * d1.h * 8192 * 3 / 4)
    cp2 = estimate_memory(config, Layout(cp=2, dp=4), work)
    assert cp2.activations == pytest.approx(base.activations / 2)
    # The plain loss peaks with three fp32 (tokens, vocab) tensors (11.7 GiB for 8B at 8192 tokens); the
    # fused loss never holds full logits: one chunk, dh and an fp32 dW.
    d = Dims.of(config, tokens=8192, c=2)
    assert base.loss == final_norm_bytes(d, loss="full_logits") + 12 * 8192 * config.vocab_size
    fused = estimate_memory(config, Layout(dp=8), Workload(seq_len=8192, fused_loss=True, microbatches=1))
    assert fused.loss < 0.45 * base.loss
    # Gradient accumulation keeps earlier micro-batches' gradients during forward.
    accumulating = estimate_memory(config, Layout(dp=8), Workload(seq_len=8192, fused_loss=False))
    assert accumulating.grads == pytest.approx(base.params)


def test_gradients_reduced_in_bf16_halve_the_reduce_buffers_and_traffic():
    from llamatron.plan.speed import NVLINK_BYTES_PER_S, estimate_step

    config = preset("llama3.1-8b")
    work = Workload(seq_len=8192, microbatches=1)
    # Full AC: the peak is inside a block's backward, with the previous block's reduce-scatter input in flight.
    fp32 = estimate_memory(config, Layout(dp=8, activation_checkpoint="full"), work)
    bf16 = estimate_memory(config, Layout(dp=8, activation_checkpoint="full", grad_reduce_in_bf16=True), work)
    block = stage_params(config, Layout(dp=8), stage=0).block
    assert fp32.phase == bf16.phase == "backward"
    assert fp32.buffers - bf16.buffers == pytest.approx(2 * block)
    assert (fp32.params, fp32.grads, fp32.activations) == (bf16.params, bf16.grads, bf16.activations)
    # Traffic: all-gathers (2 x 2 bytes) plus the reduce-scatter (4 or 2 bytes) per parameter and step, exposed
    # beyond the compute when it outlasts it (one node of 8: NVLink).
    slow = Workload(seq_len=512, microbatches=1)  # little compute, so the collectives are exposed
    steps = [estimate_step(config, Layout(dp=8, grad_reduce_in_bf16=flag), slow) for flag in (False, True)]
    total = stage_params(config, Layout(dp=8), stage=0).total
    assert steps[0].extra_s - steps[1].extra_s == pytest.approx(2 * total * 7 / 8 / NVLINK_BYTES_PER_S, rel=1e-9)
