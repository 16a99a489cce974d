"""Our model against transformers' LlamaForCausalLM, same weights, fp32 on CPU (tolerance 1e-5 rel)."""

from __future__ import annotations

import pytest
import torch

from llamatron.model import KVCache, build_model, to_hf_config
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5


def _hf_model_from(model, config):
    hf_config = transformers.LlamaConfig(**to_hf_config(config, torch_dtype="float32"))
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied configs
    return hf


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_kv_heads": 4},
        {"num_kv_heads": 1, "head_dim": 32},
        {"rope_scaling": None},
    ],
    ids=["gqa-untied", "gqa-tied", "mha", "mqa-headdim", "no-scaling"],
)
def test_logits_match_transformers(changes):
    config = tiny_config(**changes)
    model = build_model(config, seed=7).eval()
    hf = _hf_model_from(model, config)
    tokens = torch.randint(0, config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    assert _rel_err(ours, ref) <= REL_TOL


def test_kv_cache_decoding_matches_full_forward():
    config = tiny_config()
    model = build_model(config, seed=3).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(config, batch_size=2, max_len=64, device="cpu", dtype=torch.float32)
        prefill = model(tokens[:, :30], kv_cache=cache)
        steps = [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(30, 35)]
        chunk = model(tokens[:, 35:40], kv_cache=cache)
    decoded = torch.cat([prefill, *steps, chunk], dim=1)
    assert _rel_err(decoded, full) <= REL_TOL


def test_document_ids_isolate_packed_samples():
    config = tiny_config()
    model = build_model(config, seed=5).eval()
    a = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(9)])[None]
    doc_ids = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(9, dtype=torch.long)])[None]
    with torch.no_grad():
        out = model(packed, positions=positions, document_ids=doc_ids)
        alone_a, alone_b = model(a), model(b)
    assert _rel_err(out[:, :12], alone_a) <= REL_TOL
    assert _rel_err(out[:, 12:], alone_b) <= REL_TOL


def test_meta_build_is_deterministic_and_tied():
    config = tiny_config(tie_word_embeddings=True)
    one, two = build_model(config, seed=11), build_model(config, seed=11)
    for (name, p1), (_, p2) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), name
    assert one.lm_head.weight is one.embed_tokens.weight
    other = build_model(config, seed=12)
    assert not torch.equal(other.layers["0"].self_attn.q_proj.weight, one.layers["0"].self_attn.q_proj.weight)
