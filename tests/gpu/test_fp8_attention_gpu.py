"""fp8 and the attention backends on a CUDA GPU, where the real kernels run (CPU tests cover the logic
through emulation). Run on the GPU machine, with torchao installed:
    pytest -m gpu tests/gpu/test_fp8_attention_gpu.py -q

- fp8 (sm89+): every converted linear calls torch._scaled_mm three times per step (output, input
  gradient, weight gradient); the loss is within 1e-2 relative of bf16 and within 2e-3 of the emulated
  path (the output matmul uses fast accumulation on the GPU, the emulation does not).
- Attention: the probe names the kernel PyTorch picks for the job's shapes (bf16 causal: flash; a
  document mask or fp32: efficient, as flash takes neither; the seed's FL=false never flash), and
  refuses flash for a document mask, naming those that can."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamatron.errors import LlamatronError
from llamatron.model import build_model
from llamatron.parallel.attention_backend import AttentionShape, select_attention_backend
from llamatron.parallel.fp8 import apply_fp8
from tests.conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def _needs_fp8():
    pytest.importorskip("torchao.float8", reason="fp8 needs torchao (pip install 'llamatron[fp8]')")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name()} has no fp8 tensor cores")


def _config():
    return tiny_config(hidden_size=512, num_heads=8, num_kv_heads=4, ffn_hidden_size=1536, vocab_size=1024,
                       max_position_embeddings=2048)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_runs_scaled_mm_and_tracks_bf16(recipe, monkeypatch):
    _needs_fp8()
    tokens = torch.randint(0, 1024, (2, 513), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    ref_loss = _loss(build_model(_config(), device=CUDA, dtype=torch.bfloat16, seed=7), tokens)
    emulated = build_model(_config(), device=CUDA, dtype=torch.bfloat16, seed=7)
    apply_fp8(emulated, recipe=recipe, device=CUDA, emulate=True)
    emulated_loss = _loss(emulated, tokens)

    model = build_model(_config(), device=CUDA, dtype=torch.bfloat16, seed=7)
    fp8 = apply_fp8(model, recipe=recipe, device=CUDA)
    calls = []
    scaled_mm = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    loss = _loss(model, tokens)
    loss.backward()
    assert len(calls) == 3 * len(fp8.converted) == 3 * 14
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * ref_loss.item()
    assert abs(loss.item() - emulated_loss.item()) <= 2e-3 * ref_loss.item()


LLAMA_8B = dict(batch=1, heads=32, kv_heads=8, seq=8192, head_dim=128)


@pytest.mark.parametrize(("dtype", "packed", "prefer_flash", "expected"), [
    (torch.bfloat16, False, True, {"flash", "cudnn"}),
    (torch.bfloat16, True, True, {"efficient", "cudnn"}),
    (torch.float32, False, True, {"efficient"}),
    (torch.bfloat16, False, False, {"cudnn", "efficient"}),
])
def test_probe_names_the_kernel_picked(dtype, packed, prefer_flash, expected):
    shape = AttentionShape(**{**LLAMA_8B, "seq": 2048}, packed=packed)
    backend = select_attention_backend("auto", prefer_flash=prefer_flash, shape=shape, device=CUDA, dtype=dtype)
    assert backend.ran in expected, backend.describe()
    # auto ran the kernel it timed fastest (or one tied with it within 5%).
    timed = dict(backend.seconds)
    assert backend.ran in timed and timed[backend.ran] <= 1.05 * min(timed.values()), backend.describe()


def test_llama_8b_attention_runs_flash():
    shape = AttentionShape(**LLAMA_8B, packed=False)
    backend = select_attention_backend("flash", prefer_flash=True, shape=shape, device=CUDA, dtype=torch.bfloat16)
    assert backend.ran == "flash"


def test_flash_with_a_document_mask_is_refused():
    shape = AttentionShape(**{**LLAMA_8B, "seq": 1024}, packed=True)
    with pytest.raises(LlamatronError, match=r"attention_backend=flash cannot run .*backends that can: .*efficient"):
        select_attention_backend("flash", prefer_flash=True, shape=shape, device=CUDA, dtype=torch.bfloat16)
