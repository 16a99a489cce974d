"""fp8 training (parallel/fp8.py) on CPU through torchao's emulated float8 path.

- Which modules convert: every block linear whose dims are multiples of 16 (x tp), never lm_head;
  parameter names and values unchanged (checkpoints stay interchangeable with bf16 runs).
- The casts are fp8's: each of the three matmuls equals the same matmul of operands quantised by an
  independent reference (amax scale, cast to float8_e4m3fn / e5m2 and back), to 1e-6 absolute
  (only summation order may differ; measured 0.0).
- The tiny model stays close to fp32: one forward/backward's loss within 1e-3 relative (measured 6e-5),
  every parameter's gradient with cosine similarity >= 0.98 to fp32's (measured >= 0.994), yet not equal
  to fp32 (so the quantisation did happen); eight AdamW steps' losses within 1e-2 relative of fp32's
  (measured <= 1.5e-3, both recipes).
- Activation checkpointing (sel, full, offload) after fp8 recomputes the same casts: loss and gradients
  exact (rtol = atol = 0), as without fp8.
- With fp8 all-gather the converted weights carry torchao's FSDP2 fp8 all-gather hooks (tensorwise only).
- Clear errors: torchao missing, a CPU or pre-Ada GPU without emulation, an unknown recipe."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamatron.errors import LlamatronError
from llamatron.model import build_model
from llamatron.parallel.ac import apply_ac
from llamatron.parallel.fp8 import apply_fp8, fp8_device_problem, fp8_eligibility
from tests.conftest import tiny_config

CPU = torch.device("cpu")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _model(**changes):
    return build_model(tiny_config(**changes), seed=7)


def _loss(model):
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _float8_linear_cls():
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


def test_block_linears_convert_and_the_output_layer_stays():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fp8 = apply_fp8(model, device=CPU, emulate=True)
    expected = [f"layers.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    assert sorted(fp8.converted) == sorted(expected)
    assert fp8.kept == {"lm_head": "output layer"}
    float8_linear = _float8_linear_cls()
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], float8_linear) for name in expected)
    assert not isinstance(modules["lm_head"], float8_linear)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name].detach(), value, rtol=0, atol=0, msg=name)


def test_dims_not_multiple_of_16_stay_in_bf16_and_tp_counts_the_slice():
    # ffn 72: gate/up/down cannot feed torch._scaled_mm. ffn 80 can, but not split 2 ways (40 per rank).
    convert, kept = fp8_eligibility(_model(ffn_hidden_size=72))
    assert not any("mlp" in name for name in convert) and len(convert) == 8
    assert kept["layers.0.mlp.down_proj"] == "72x64 not a multiple of 16"
    convert, _ = fp8_eligibility(_model(ffn_hidden_size=80), tp=1)
    assert len(convert) == 14
    convert, kept = fp8_eligibility(_model(ffn_hidden_size=80), tp=2)
    assert sorted(n for n in convert if n.startswith("layers.0.")) == [
        f"layers.0.self_attn.{name}_proj" for name in "koqv"]
    assert kept["layers.1.mlp.up_proj"] == "64x80 not a multiple of 32"


def _reference_cast(t: torch.Tensor, dtype: torch.dtype, *, dim: int | None = None, pow2: bool = False):
    """fp8 quantise-dequantise: scale so the amax (of the tensor, or along `dim`) maps to the format's
    largest value, cast, cast back."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (torch.finfo(dtype).max / amax.double()).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    limit = torch.finfo(dtype).max
    return (t * scale).clamp(-limit, limit).to(dtype).float() / scale


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_each_matmul_uses_fp8_operands(recipe):
    gen = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32, bias=False))
    weight = layer[0].weight.detach().clone()
    apply_fp8(layer, recipe=recipe, device=CPU, emulate=True)
    x = torch.randn(8, 64, generator=gen, requires_grad=True)
    grad_out = torch.randn(8, 32, generator=gen)
    out = layer(x)
    out.backward(grad_out)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    if recipe == "tensorwise":  # one scale per tensor; gradients in e5m2 (more range)
        q_x, q_w, q_g = (_reference_cast(t, d) for t, d in ((x.detach(), e4), (weight, e4), (grad_out, e5)))
        refs = (q_x @ q_w.t(), q_g @ q_w, q_g.t() @ q_x)
    else:  # a power-of-two scale per row of each operand's contraction, all e4m3
        def q(t, dim):
            return _reference_cast(t, e4, dim=dim, pow2=True)
        xd = x.detach()
        refs = (q(xd, -1) @ q(weight, -1).t(), q(grad_out, -1) @ q(weight, 0), q(grad_out, 0).t() @ q(xd, 0))
    for got, ref, what in zip((out, x.grad, layer[0].weight.grad), refs, ("output", "grad input", "grad weight"),
                              strict=True):
        torch.testing.assert_close(got.detach(), ref, rtol=0, atol=1e-6, msg=what)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_tiny_model_stays_close_to_fp32(recipe):
    ref = _model()
    ref_loss = _loss(ref)
    ref_loss.backward()
    model = _model()
    apply_fp8(model, recipe=recipe, device=CPU, emulate=True)
    loss = _loss(model)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-3 * ref_loss.item()
    assert loss.item() != ref_loss.item()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        cos = F.cosine_similarity(p.grad.flatten(), ref_grads[name].grad.flatten(), dim=0)
        assert cos >= 0.98, (name, cos.item())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_training_steps_track_fp32(recipe):
    def run(fp8: bool) -> list[float]:
        model = _model()
        if fp8:
            apply_fp8(model, recipe=recipe, device=CPU, emulate=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            loss = _loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    ref, got = run(False), run(True)
    assert ref[-1] < ref[0] - 1.0  # it learns, so the comparison covers moving weights
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-2, atol=0)


@pytest.mark.parametrize("mode", ["sel", "full", "offload"])
def test_activation_checkpointing_recomputes_the_same_fp8_casts(mode):
    def grads(ac: bool):
        model = _model()
        apply_fp8(model, device=CPU, emulate=True)
        if ac:
            apply_ac(model, mode=mode, layers=1)
        loss = _loss(model)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    (ref_loss, ref), (loss, got) = grads(False), grads(True)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import raises ImportError
    with pytest.raises(LlamatronError, match=r"install llamatron\[fp8\] \(torchao\)"):
        apply_fp8(_model(), device=CPU, emulate=True)


def test_device_without_fp8_tensor_cores_is_refused(monkeypatch):
    with pytest.raises(LlamatronError, match="compute capability 8.9.*runs on cpu.*fp8_emulate"):
        apply_fp8(_model(), device=CPU)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    problem = fp8_device_problem(torch.device("cuda", 0), emulate=False)
    assert "NVIDIA A100-SXM4-80GB is sm80" in problem and "8.9" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_device_problem(torch.device("cuda", 0), emulate=False) is None
    assert fp8_device_problem(CPU, emulate=True) is None


def test_unknown_recipe_is_refused():
    with pytest.raises(LlamatronError, match="training.fp8_recipe='blockwise' is not one of tensorwise, rowwise"):
        apply_fp8(_model(), recipe="blockwise", device=CPU, emulate=True)


def test_fsdp_all_gather_only_with_tensorwise():
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    model = _model()
    assert apply_fp8(model, device=CPU, emulate=True, fsdp_float8_all_gather=True).fsdp_float8_all_gather
    # The weight subclass whose FSDP2 hooks cast each shard to fp8 before the all-gather.
    assert isinstance(model.layers["0"].mlp.up_proj.weight, WeightWithDynamicFloat8CastTensor)
    assert not isinstance(model.lm_head.weight, WeightWithDynamicFloat8CastTensor)
    rowwise = apply_fp8(_model(), recipe="rowwise", device=CPU, emulate=True, fsdp_float8_all_gather=True)
    assert not rowwise.fsdp_float8_all_gather
    assert "fp8 all-gather under FSDP: off" in rowwise.describe()
