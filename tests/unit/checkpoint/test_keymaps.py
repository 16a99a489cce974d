"""The Megatron-Core layout of DESIGN.md section 3, checked on weights whose values say where they came from."""

from __future__ import annotations

import pytest
import torch

from llamatron.checkpoint import keymaps
from llamatron.errors import LlamatronError
from tests.conftest import tiny_config


def _labelled_state(config) -> dict[str, torch.Tensor]:
    """Every row of every matrix holds one value that encodes (tensor, row): row r of tensor number t
    is filled with t * 1000 + r, so a test can say which source row ended up where."""
    from llamatron.model import build_model

    state = build_model(config, seed=0).state_dict()
    out = {}
    for t, (name, tensor) in enumerate(sorted(state.items())):
        rows = torch.arange(tensor.shape[0], dtype=torch.float32) + 1000.0 * (t + 1)
        out[name] = rows[:, None].expand_as(tensor).clone() if tensor.dim() == 2 else rows.clone()
    return out


def _row_ids(tensor: torch.Tensor) -> list[float]:
    return tensor[:, 0].tolist()


def test_qkv_interleave_per_group_and_tp_split():
    # 4 query heads, 2 KV groups, head dim 2, hidden 8: per group 2 query heads (4 rows), k (2), v (2).
    config = tiny_config(hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, num_layers=1, ffn_hidden_size=8)
    state = _labelled_state(config)
    q, k, v = (state[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    expected = torch.cat([q[0:4], k[0:2], v[0:2], q[4:8], k[2:4], v[2:4]])
    plan = keymaps.make_plan(config, tp=1, pp=1)
    shard = keymaps.build_shard(keymaps.state_dict_reader(state), plan, tp_rank=0, pp_rank=0)
    qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 2, 8)
    assert torch.equal(qkv, expected)
    # TP 2: each rank holds one whole group, in the same per-group order.
    plan2 = keymaps.make_plan(config, tp=2, pp=1)
    for rank in range(2):
        part = keymaps.build_shard(keymaps.state_dict_reader(state), plan2, tp_rank=rank, pp_rank=0)
        assert torch.equal(part["decoder.layers.0.self_attention.linear_qkv.weight"], expected[rank * 8 : (rank + 1) * 8])


def test_llama8b_qkv_block_size():
    # DESIGN: 8B's linear_qkv is 6144 x 4096 in blocks of 768 rows (4 q heads + k + v, head dim 128).
    q = torch.zeros(4096, 1)
    k = torch.ones(1024, 1)
    v = torch.full((1024, 1), 2.0)
    qkv = keymaps.interleave_qkv(q, k, v, groups=8, head_dim=128)
    assert qkv.shape == (6144, 1)
    block = qkv[:768, 0]
    assert block[:512].eq(0).all() and block[512:640].eq(1).all() and block[640:].eq(2).all()
    back = keymaps.split_qkv(qkv, groups=8, heads_per_group=4, head_dim=128)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_fc1_proj_fc2_splits():
    config = tiny_config(num_layers=1, ffn_hidden_size=8, hidden_size=16, num_heads=4, num_kv_heads=2)
    state = _labelled_state(config)
    gate, up = state["layers.0.mlp.gate_proj.weight"], state["layers.0.mlp.up_proj.weight"]
    down, o = state["layers.0.mlp.down_proj.weight"], state["layers.0.self_attn.o_proj.weight"]
    down = down + torch.arange(8.0)[None]  # make columns distinguishable too
    o = o + torch.arange(16.0)[None]
    state["layers.0.mlp.down_proj.weight"], state["layers.0.self_attn.o_proj.weight"] = down, o
    plan = keymaps.make_plan(config, tp=2, pp=1)
    for rank in range(2):
        shard = keymaps.build_shard(keymaps.state_dict_reader(state), plan, tp_rank=rank, pp_rank=0)
        fc1 = shard["decoder.layers.0.mlp.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([gate[rank * 4 : rank * 4 + 4], up[rank * 4 : rank * 4 + 4]]))
        assert torch.equal(shard["decoder.layers.0.mlp.linear_fc2.weight"], down[:, rank * 4 : rank * 4 + 4])
        assert torch.equal(shard["decoder.layers.0.self_attention.linear_proj.weight"], o[:, rank * 8 : rank * 8 + 8])
        # norms are replicated, fused into the following linear (pai layout)
        assert torch.equal(
            shard["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"], state["layers.0.input_layernorm.weight"]
        )
        assert torch.equal(
            shard["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"], state["layers.0.post_attention_layernorm.weight"]
        )


@pytest.mark.parametrize(
    ("vocab", "tp", "multiple", "padded"),
    [(128256, 1, 1, 128256), (128256, 4, 1, 128256), (128256, 8, 1, 128256), (128256, 4, 128, 128512),
     (128256, 1, 128, 128256), (10, 4, 1, 12)],
)
def test_padded_vocab_size(vocab, tp, multiple, padded):
    assert keymaps.padded_vocab_size(vocab, tp=tp, multiple=multiple) == padded


def test_vocab_padding_rows_are_zero_and_dropped_on_merge():
    config = tiny_config(vocab_size=10, num_layers=1, num_kv_heads=4)
    state = _labelled_state(config)
    plan = keymaps.make_plan(config, tp=4, pp=1)
    assert plan.padded_vocab == 12
    shards = [keymaps.build_shard(keymaps.state_dict_reader(state), plan, tp_rank=r, pp_rank=0) for r in range(4)]
    emb = state["embed_tokens.weight"]
    assert torch.equal(shards[2]["embedding.word_embeddings.weight"], emb[6:9])
    last = shards[3]["output_layer.weight"]
    assert last.shape == (3, 64)
    assert torch.equal(last[0], state["lm_head.weight"][9]) and last[1:].eq(0).all()
    assert torch.equal(keymaps.merge_vocab(shards, "embedding.word_embeddings.weight", plan), emb)


def _layer_keys(local: int, layout: str) -> set[str]:
    p = f"decoder.layers.{local}."
    keys = {p + "self_attention.linear_qkv.weight", p + "self_attention.linear_proj.weight",
            p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"}
    if layout == "mcore-local":
        return keys | {p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"}
    extra = {p + s for s in ("self_attention.core_attention._extra_state", "self_attention.linear_proj._extra_state",
                             "self_attention.linear_qkv._extra_state", "mlp.linear_fc1._extra_state",
                             "mlp.linear_fc2._extra_state")}
    return keys | extra | {p + "self_attention.linear_qkv.layer_norm_weight", p + "mlp.linear_fc1.layer_norm_weight"}


@pytest.mark.parametrize("layout", keymaps.LAYOUTS)
@pytest.mark.parametrize("tied", [False, True])
def test_key_names_per_layout_and_stage(layout, tied):
    config = tiny_config(num_layers=4, tie_word_embeddings=tied)
    state = _labelled_state(config)
    plan = keymaps.make_plan(config, tp=1, pp=2, layout=layout)
    first = keymaps.build_shard(keymaps.state_dict_reader(state), plan, tp_rank=0, pp_rank=0)
    last = keymaps.build_shard(keymaps.state_dict_reader(state), plan, tp_rank=0, pp_rank=1)
    # layer numbering restarts at 0 on each stage; embedding on stage 0 only
    assert set(first) == {"embedding.word_embeddings.weight"} | _layer_keys(0, layout) | _layer_keys(1, layout)
    final_norm = "final_layernorm.weight" if layout == "pai" else "decoder.final_layernorm.weight"
    # the last stage always has an output layer: its own, or (tied) Megatron's copy of the embedding
    assert set(last) == {final_norm, "output_layer.weight"} | _layer_keys(0, layout) | _layer_keys(1, layout)
    source = "embed_tokens.weight" if tied else "lm_head.weight"
    assert torch.equal(last["output_layer.weight"], state[source])
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"], state["layers.2.mlp.down_proj.weight"])
    assert all(v is None for k, v in first.items() if k.endswith("_extra_state"))
    assert keymaps.detect_layout(last) == layout


def test_tied_single_stage_has_no_output_layer():
    config = tiny_config(tie_word_embeddings=True)
    plan = keymaps.make_plan(config, tp=2, pp=1)
    shard = keymaps.build_shard(keymaps.state_dict_reader(_labelled_state(config)), plan, tp_rank=1, pp_rank=0)
    assert "output_layer.weight" not in shard and "embedding.word_embeddings.weight" in shard


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 4}, "TP 4 must divide the 2 KV groups and 4 attention heads"),
        ({"tp": 3}, "TP 3 must divide the 2 KV groups"),
        ({"pp": 3}, "PP 3 does not divide the 4 layers"),
        ({"pp": 2, "pp_layers": [1, 2]}, "--pp-layers 1,2: needs 2 positive counts summing to 4"),
        ({"pp": 8}, "PP 8 is more than the 4 layers"),
        ({"layout": "te"}, "unknown layout 'te'"),
    ],
)
def test_bad_splits_are_refused(kwargs, message):
    config = tiny_config(num_layers=4)
    with pytest.raises(LlamatronError, match=message.replace("(", r"\(")):
        keymaps.make_plan(config, **{"tp": 1, "pp": 1, **kwargs})


def test_uneven_pipeline_split():
    config = tiny_config(num_layers=5)
    plan = keymaps.make_plan(config, tp=1, pp=2, pp_layers=[2, 3])
    assert plan.stage_layers == (2, 3) and plan.stage_of(2) == (1, 0) and plan.stage_of(4) == (1, 2)


def test_merge_is_the_inverse_of_build():
    config = tiny_config(num_layers=2, num_kv_heads=2, num_heads=4)
    state = _labelled_state(config)
    plan = keymaps.make_plan(config, tp=2, pp=1, layout="mcore-local")
    shards = [keymaps.build_shard(keymaps.state_dict_reader(state), plan, tp_rank=r, pp_rank=0) for r in range(2)]
    for layer in range(2):
        for name, tensor in keymaps.merge_layer(shards, plan, layer=layer).items():
            assert torch.equal(tensor, state[name]), name
