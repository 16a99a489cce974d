"""Pure tables and tensor transforms between llamatron's (HF) names and Megatron-Core shards.

No file I/O here: shards are built from a `read` callable and merged from state dicts, so the same
functions serve conversion, resharding and loading, and tests can run them on in-memory tensors.
The format is DESIGN.md section 3. Internal names are HF's without the `model.` prefix
(`layers.3.self_attn.q_proj.weight`, `embed_tokens.weight`, `norm.weight`, `lm_head.weight`).

Tied embeddings follow megatron-core's LanguageModule: with PP == 1 the output layer reuses the
embedding and has no key of its own; with PP > 1 the last stage holds a copy of its TP slice of
the embedding as `output_layer.weight` (kept equal during training by an all-reduce). On read
the copy is accepted and ignored; stage 0's embedding is the weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from llamatron.errors import LlamatronError, collect_problems
from llamatron.model.config import LlamaConfig

LAYOUTS = ("pai", "mcore", "mcore-local")
"""pai: the seed's (TE modules, norms fused into the next linear, top-level final_layernorm);
mcore: upstream GPTModel with the TE spec (final norm under decoder.); mcore-local: no TE."""

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = {"pai": "final_layernorm.weight", "mcore": "decoder.final_layernorm.weight",
              "mcore-local": "decoder.final_layernorm.weight"}
# TE modules carry FP8 metadata as `_extra_state`; converted checkpoints have none, so None.
TE_EXTRA_STATE = (
    "self_attention.core_attention._extra_state",
    "self_attention.linear_proj._extra_state",
    "self_attention.linear_qkv._extra_state",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2._extra_state",
)
# Megatron per-layer suffix -> internal per-layer suffix, for the tensors mapped one to one.
_NORMS = {
    "te": {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
           "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight"},
    "local": {"input_layernorm.weight": "input_layernorm.weight",
              "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"},
}
QKV, PROJ = "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"
FC1, FC2 = "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"

Read = Callable[..., torch.Tensor]
"""read(internal_name, rows=slice | None, cols=slice | None) -> that part of the full tensor."""


def padded_vocab_size(vocab_size: int, *, tp: int, multiple: int = 1) -> int:
    """Megatron's rule: round up to a multiple of `multiple * tp`. multiple=1 is the seed's
    (128256 stays 128256 when TP divides it); multiple=128 is upstream Megatron's default."""
    step = multiple * tp
    return math.ceil(vocab_size / step) * step


def stage_layer_counts(num_layers: int, *, pp: int, pp_layers: list[int] | None = None) -> tuple[int, ...]:
    """Layers per pipeline stage: even by default, or the user's explicit counts."""
    if pp_layers is not None:
        if len(pp_layers) != pp or sum(pp_layers) != num_layers or min(pp_layers) < 1:
            raise LlamatronError(
                f"--pp-layers {','.join(map(str, pp_layers))}: needs {pp} positive counts summing to "
                f"{num_layers} layers"
            )
        return tuple(pp_layers)
    if num_layers % pp:
        raise LlamatronError(
            f"PP {pp} does not divide the {num_layers} layers; choose a PP that divides it or give "
            "per-stage counts with --pp-layers"
        )
    return (num_layers // pp,) * pp


@dataclass(kw_only=True, frozen=True)
class ShardPlan:
    """How one model is cut into TP x PP Megatron-Core shards."""

    config: LlamaConfig
    tp: int
    """tensor_model_parallel_size"""
    pp: int
    """pipeline_model_parallel_size"""
    layout: str = "pai"
    stage_layers: tuple[int, ...]
    """decoder layers on each pipeline stage (they restart at 0 on each)"""
    padded_vocab: int
    """rows of the stored embedding/output layer (padding rows are zero)"""

    def __post_init__(self) -> None:
        c = self.config
        problems = []
        if self.layout not in LAYOUTS:
            problems.append(f"unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        if self.tp < 1 or self.pp < 1:
            problems.append(f"TP and PP must be at least 1, got TP {self.tp}, PP {self.pp}")
        elif c.num_kv_heads % self.tp or c.num_heads % self.tp:
            problems.append(
                f"TP {self.tp} must divide the {c.num_kv_heads} KV groups and {c.num_heads} attention heads "
                f"(Megatron splits whole groups); use a TP that divides {math.gcd(c.num_kv_heads, c.num_heads)}"
            )
        elif c.ffn_hidden_size % self.tp:
            problems.append(f"TP {self.tp} must divide ffn_hidden_size {c.ffn_hidden_size}")
        if len(self.stage_layers) != self.pp or sum(self.stage_layers) != c.num_layers:
            problems.append(f"stage layer counts {self.stage_layers} do not cover {c.num_layers} layers on PP {self.pp}")
        if self.padded_vocab < c.vocab_size or (self.tp >= 1 and self.padded_vocab % self.tp):
            problems.append(f"padded vocab {self.padded_vocab} must be >= {c.vocab_size} and divisible by TP {self.tp}")
        collect_problems(problems, what="invalid TP/PP split")

    @property
    def te(self) -> bool:
        return self.layout != "mcore-local"

    def stage_start(self, pp_rank: int) -> int:
        return sum(self.stage_layers[:pp_rank])

    def stage_range(self, pp_rank: int) -> range:
        start = self.stage_start(pp_rank)
        return range(start, start + self.stage_layers[pp_rank])

    def stage_of(self, layer: int) -> tuple[int, int]:
        """(pp_rank, local index) of a global layer index."""
        for pp_rank in range(self.pp):
            if layer in self.stage_range(pp_rank):
                return pp_rank, layer - self.stage_start(pp_rank)
        raise AssertionError(f"layer {layer} outside the model")

    def expected_keys(self, pp_rank: int) -> set[str]:
        """Every model key a shard of this stage holds (the same on every TP rank)."""
        keys = set()
        norms = _NORMS["te" if self.te else "local"]
        for local in range(self.stage_layers[pp_rank]):
            suffixes = [QKV, PROJ, FC1, FC2, *norms, *(TE_EXTRA_STATE if self.te else ())]
            keys.update(f"decoder.layers.{local}.{s}" for s in suffixes)
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        if first:
            keys.add(EMBEDDING)
        if last:
            keys.add(FINAL_NORM[self.layout])
            if not self.config.tie_word_embeddings or not first:
                keys.add(OUTPUT_LAYER)
        return keys


def make_plan(
    config: LlamaConfig, *, tp: int, pp: int, layout: str = "pai", pp_layers: list[int] | None = None,
    pad_vocab_multiple: int = 1,
) -> ShardPlan:
    """A validated plan; every user mistake in the split raises one LlamatronError naming it."""
    if pad_vocab_multiple < 1:
        raise LlamatronError(f"--pad-vocab-multiple must be >= 1, got {pad_vocab_multiple}")
    if tp < 1 or pp < 1:
        raise LlamatronError(f"TP and PP must be at least 1, got TP {tp}, PP {pp}")
    if pp > config.num_layers:
        raise LlamatronError(f"PP {pp} is more than the {config.num_layers} layers; use PP <= {config.num_layers}")
    return ShardPlan(
        config=config, tp=tp, pp=pp, layout=layout,
        stage_layers=stage_layer_counts(config.num_layers, pp=pp, pp_layers=pp_layers),
        padded_vocab=padded_vocab_size(config.vocab_size, tp=tp, multiple=pad_vocab_multiple),
    )


# ---- QKV interleave ---------------------------------------------------------------------------


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: int, head_dim: int) -> torch.Tensor:
    """Per KV group: its query heads, then its k head, then its v head (Megatron's linear_qkv rows).
    q: (groups * heads_per_group * head_dim, hidden), k and v: (groups * head_dim, hidden)."""
    hidden = q.shape[1]
    q = q.reshape(groups, -1, hidden)  # (groups, heads_per_group * head_dim, hidden)
    k = k.reshape(groups, head_dim, hidden)
    v = v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # (groups * (hpg + 2) * head_dim, hidden)


def split_qkv(
    qkv: torch.Tensor, *, groups: int, heads_per_group: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of interleave_qkv: (q, k, v) with HF's row order."""
    hidden = qkv.shape[1]
    q, k, v = _qkv_blocks(qkv, groups=groups, heads_per_group=heads_per_group, head_dim=head_dim)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _qkv_blocks(
    qkv: torch.Tensor, *, groups: int, heads_per_group: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (groups, rows, hidden) of q, k and v: concatenating TP ranks' views on dim 0 then
    flattening copies each weight once (flattening a strided view first would copy it twice)."""
    blocks = qkv.reshape(groups, (heads_per_group + 2) * head_dim, qkv.shape[1])
    q, k, v = blocks.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return q, k, v


# ---- HF -> shard ------------------------------------------------------------------------------


def _rows(rank: int, total: int, parts: int) -> slice:
    size = total // parts
    return slice(rank * size, (rank + 1) * size)


def shard_vocab_rows(read: Read, name: str, plan: ShardPlan, *, tp_rank: int) -> torch.Tensor:
    """This TP rank's rows of the padded embedding (or output layer); rows past the true vocab are zero."""
    vocab, hidden = plan.config.vocab_size, plan.config.hidden_size
    rows = _rows(tp_rank, plan.padded_vocab, plan.tp)
    real = slice(rows.start, min(rows.stop, vocab))
    if real.start >= real.stop:
        part = None
    else:
        part = read(name, rows=real)
    if part is not None and real.stop == rows.stop:
        return part.clone()  # owned: `read` may return a view of a memory-mapped file
    out = torch.zeros(rows.stop - rows.start, hidden, dtype=part.dtype if part is not None else torch.float32)
    if part is not None:
        out[: real.stop - real.start] = part
    return out  # (padded_vocab / tp, hidden)


def shard_layer(read: Read, plan: ShardPlan, *, layer: int, tp_rank: int) -> dict[str, torch.Tensor | None]:
    """One decoder layer's tensors for one TP rank, keyed by Megatron's per-layer suffix."""
    c, tp = plan.config, plan.tp
    d = c.dim_per_head
    p = f"layers.{layer}."
    groups = _rows(tp_rank, c.num_kv_heads, tp)  # whole KV groups per rank
    heads_per_group = c.num_heads // c.num_kv_heads
    q = read(p + "self_attn.q_proj.weight", rows=slice(groups.start * heads_per_group * d, groups.stop * heads_per_group * d))
    k = read(p + "self_attn.k_proj.weight", rows=slice(groups.start * d, groups.stop * d))
    v = read(p + "self_attn.v_proj.weight", rows=slice(groups.start * d, groups.stop * d))
    ffn = _rows(tp_rank, c.ffn_hidden_size, tp)
    out = {
        QKV: interleave_qkv(q, k, v, groups=groups.stop - groups.start, head_dim=d),
        PROJ: _owned(read(p + "self_attn.o_proj.weight", cols=_rows(tp_rank, c.q_size, tp))),
        FC1: torch.cat([read(p + "mlp.gate_proj.weight", rows=ffn), read(p + "mlp.up_proj.weight", rows=ffn)]),
        FC2: _owned(read(p + "mlp.down_proj.weight", cols=ffn)),
    }
    for mcore_suffix, internal_suffix in _NORMS["te" if plan.te else "local"].items():
        out[mcore_suffix] = _owned(read(p + internal_suffix))
    if plan.te:
        out.update(dict.fromkeys(TE_EXTRA_STATE))
    return out


def build_shard(
    read: Read, plan: ShardPlan, *, tp_rank: int, pp_rank: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor | None]:
    """The `model` state dict of shard (tp_rank, pp_rank), tensors cast to `dtype` and contiguous."""
    state: dict[str, torch.Tensor | None] = {}
    first, last = pp_rank == 0, pp_rank == plan.pp - 1
    embedding_name = "embed_tokens.weight"
    if first:
        state[EMBEDDING] = shard_vocab_rows(read, embedding_name, plan, tp_rank=tp_rank)
    for local, layer in enumerate(plan.stage_range(pp_rank)):
        for suffix, tensor in shard_layer(read, plan, layer=layer, tp_rank=tp_rank).items():
            state[f"decoder.layers.{local}.{suffix}"] = tensor
        # Compacted layer by layer: no view into the source outlives its layer, so a `read` that
        # reopens its files per layer releases the mapped pages of finished layers.
        _compact_all(state, dtype=dtype)
    if last:
        state[FINAL_NORM[plan.layout]] = _owned(read("norm.weight"))
        if not plan.config.tie_word_embeddings:
            state[OUTPUT_LAYER] = shard_vocab_rows(read, "lm_head.weight", plan, tp_rank=tp_rank)
        elif not first:
            state[OUTPUT_LAYER] = shard_vocab_rows(read, embedding_name, plan, tp_rank=tp_rank)
    _compact_all(state, dtype=dtype)
    return state


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy. Tensors `read` returns may be views of a memory-mapped file (safetensors
    slices); one kept in a shard would keep the whole mapping, and its touched pages, resident."""
    return tensor.clone(memory_format=torch.contiguous_format)


def _compact_all(state: dict[str, torch.Tensor | None], *, dtype: torch.dtype | None) -> None:
    for key, tensor in state.items():
        if tensor is not None:
            state[key] = _compact(tensor.to(dtype=dtype or tensor.dtype))


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its bytes: torch.save writes a view's whole storage, so views
    into larger buffers are copied; fresh results (cat, casts) are kept as they are, saving a copy."""
    if not tensor.is_contiguous():
        return tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


# ---- shards -> HF -----------------------------------------------------------------------------


def check_stage_keys(keys: Iterable[str], plan: ShardPlan, *, pp_rank: int, source: str) -> None:
    """Refuse a shard whose keys are not exactly the plan's (TE `_extra_state` keys are optional)."""
    keys = set(keys)
    expected = plan.expected_keys(pp_rank)
    optional = {k for k in expected if k.endswith("._extra_state")}
    unexpected = sorted(k for k in keys - expected if not k.endswith("._extra_state"))
    missing = sorted(expected - optional - keys)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)} (not a Llama model in layout {plan.layout!r}?)")
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    collect_problems(problems, what=source)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


@dataclass(frozen=True)
class Pieces:
    """One internal tensor as views of TP shard tensors: `torch.cat(parts, dim)` reshaped to `shape`.
    Kept apart from the cat so the same table serves merging in memory and copying file byte ranges
    (`checkpoint/stored.py`) without reading the data into this process."""

    parts: tuple[torch.Tensor, ...]
    dim: int
    shape: tuple[int, ...]

    def merge(self) -> torch.Tensor:
        """A fresh tensor (never a view of a shard: a mapped file stays mapped while a view lives)."""
        return torch.cat(self.parts, dim=self.dim).reshape(self.shape)


def layer_pieces(tp_states: list[dict[str, torch.Tensor]], plan: ShardPlan, *, layer: int) -> dict[str, Pieces]:
    """One decoder layer's internal tensors as pieces of its stage's TP shards (any TP), in HF order
    with the norms last."""
    c = plan.config
    _, local = plan.stage_of(layer)
    pre = f"decoder.layers.{local}."
    heads_per_group = c.num_heads // c.num_kv_heads
    groups = c.num_kv_heads // plan.tp
    hidden, d = c.hidden_size, c.dim_per_head
    qs, ks, vs, gates, ups = [], [], [], [], []
    for state in tp_states:
        q, k, v = _qkv_blocks(state[pre + QKV], groups=groups, heads_per_group=heads_per_group, head_dim=d)
        qs.append(q), ks.append(k), vs.append(v)  # (groups / tp, rows, hidden) views
        gate, up = state[pre + FC1].chunk(2, dim=0)
        gates.append(gate), ups.append(up)
    p = f"layers.{layer}."
    out = {
        p + "self_attn.q_proj.weight": Pieces(tuple(qs), 0, (c.num_heads * d, hidden)),
        p + "self_attn.k_proj.weight": Pieces(tuple(ks), 0, (c.num_kv_heads * d, hidden)),
        p + "self_attn.v_proj.weight": Pieces(tuple(vs), 0, (c.num_kv_heads * d, hidden)),
        p + "self_attn.o_proj.weight": Pieces(tuple(s[pre + PROJ] for s in tp_states), 1, (hidden, c.q_size)),
        p + "mlp.gate_proj.weight": Pieces(tuple(gates), 0, (c.ffn_hidden_size, hidden)),
        p + "mlp.up_proj.weight": Pieces(tuple(ups), 0, (c.ffn_hidden_size, hidden)),
        p + "mlp.down_proj.weight": Pieces(tuple(s[pre + FC2] for s in tp_states), 1, (hidden, c.ffn_hidden_size)),
    }
    for mcore_suffix, internal_suffix in _NORMS["te" if plan.te else "local"].items():
        out[p + internal_suffix] = Pieces((tp_states[0][pre + mcore_suffix],), 0, (hidden,))
    return out


def merge_layer(tp_states: list[dict[str, torch.Tensor]], plan: ShardPlan, *, layer: int) -> dict[str, torch.Tensor]:
    """One decoder layer's internal tensors from the TP shards of its stage (any TP)."""
    return {name: pieces.merge() for name, pieces in layer_pieces(tp_states, plan, layer=layer).items()}


def vocab_pieces(tp_states: list[dict[str, torch.Tensor]], key: str, plan: ShardPlan) -> Pieces:
    """The (vocab, hidden) matrix with Megatron's padding rows dropped (each rank's real rows)."""
    vocab, parts, start = plan.config.vocab_size, [], 0
    for state in tp_states:
        rows = state[key]
        if start < vocab:
            parts.append(rows[: min(rows.shape[0], vocab - start)])
        start += rows.shape[0]
    return Pieces(tuple(parts), 0, (vocab, plan.config.hidden_size))


def merge_vocab(tp_states: list[dict[str, torch.Tensor]], key: str, plan: ShardPlan) -> torch.Tensor:
    """The (vocab, hidden) matrix with Megatron's padding rows dropped."""
    return vocab_pieces(tp_states, key, plan).merge()


def extra_names(plan: ShardPlan) -> list[str]:
    """The internal tensors outside the decoder layers, in HF order."""
    return ["embed_tokens.weight", "norm.weight", *([] if plan.config.tie_word_embeddings else ["lm_head.weight"])]


def extra_pieces(tp_states: list[dict[str, torch.Tensor]], plan: ShardPlan, *, name: str) -> Pieces:
    """The embedding (from stage 0), final norm or untied output layer (last stage), by internal name."""
    if name == "embed_tokens.weight":
        return vocab_pieces(tp_states, EMBEDDING, plan)
    if name == "norm.weight":
        return Pieces((tp_states[0][FINAL_NORM[plan.layout]],), 0, (plan.config.hidden_size,))
    if name == "lm_head.weight" and not plan.config.tie_word_embeddings:
        return vocab_pieces(tp_states, OUTPUT_LAYER, plan)
    raise KeyError(name)


def merge_extra(tp_states: list[dict[str, torch.Tensor]], plan: ShardPlan, *, name: str) -> torch.Tensor:
    """The embedding (from stage 0), final norm or untied output layer (last stage), by internal name."""
    return extra_pieces(tp_states, plan, name=name).merge()


def extra_stage(plan: ShardPlan, name: str) -> int:
    """The pipeline stage that holds an extra tensor."""
    return 0 if name == "embed_tokens.weight" else plan.pp - 1


def detect_layout(keys: Iterable[str]) -> str | None:
    """The layout of a state dict from its keys; None when one stage's keys cannot tell pai from mcore
    (a non-last stage of a TE layout: use the last stage's keys)."""
    keys = set(keys)
    if FINAL_NORM["pai"] in keys:
        return "pai"
    local = any(k.endswith(".input_layernorm.weight") for k in keys)
    if FINAL_NORM["mcore"] in keys:
        return "mcore-local" if local else "mcore"
    if local:
        return "mcore-local"
    return None


def state_dict_reader(state: dict[str, torch.Tensor]) -> Read:
    """A `read` over an in-memory internal state dict (tests, and models already in memory)."""

    def read(name: str, *, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        tensor = state[name]
        if rows is not None:
            tensor = tensor[rows]
        if cols is not None:
            tensor = tensor[:, cols]
        return tensor

    return read
