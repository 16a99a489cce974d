"""LLaMA 3.x architecture description: presets, and the mapping to and from HF `config.json`.

This is the model's own config (shapes and numerics only). Job-level settings (parallelism, data,
optimiser) live in `llamatron.config`, which builds on this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llamatron.errors import LlamatronError


@dataclass(kw_only=True, frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(kw_only=True, frozen=True)
class LlamaConfig:
    """Shapes and numerics of a LLaMA 3.x decoder."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    """Key/value heads (Megatron's num_query_groups); GQA when below num_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads (Megatron's kv_channels)."""
    ffn_hidden_size: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    """Standard deviation of the normal init (Megatron's init_method_std)."""
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads > 0 and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is given"
            )
        if self.dim_per_head % 2:
            problems.append(f"head dimension must be even for RoPE, got {self.dim_per_head}")
        if problems:
            raise LlamatronError("invalid model config: " + "; ".join(problems))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // max(self.num_heads, 1)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.dim_per_head

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, f, v, layers = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        total = layers * per_layer + h
        if include_embedding:
            total += v * h if self.tie_word_embeddings else 2 * v * h
        return total


_LLAMA31_ROPE = RopeScaling()
_LLAMA32_ROPE = RopeScaling(factor=32.0)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(
        hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "llama3.1-70b": LlamaConfig(
        hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_hidden_size=28672,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "llama3.1-405b": LlamaConfig(
        hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8, ffn_hidden_size=53248,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "llama3.2-1b": LlamaConfig(
        hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_hidden_size=8192,
        head_dim=64, rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
    ),
    "llama3.2-3b": LlamaConfig(
        hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_hidden_size=8192,
        head_dim=128, rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
    ),
    # Small enough for CPU tests and the demo; the Llama 3 vocabulary keeps the real tokenizer usable.
    "tiny": LlamaConfig(
        hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=192,
        max_position_embeddings=2048, rope_scaling=_LLAMA31_ROPE,
    ),
    # `tiny` with a 2048-id vocabulary: for token-id data (no tokenizer) it takes ~10x less CPU per step, which
    # is what tests of training mechanics (layouts, resume, offload) need; ids must stay below 2048.
    "tiny-2k": LlamaConfig(
        vocab_size=2048, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=192,
        max_position_embeddings=2048, rope_scaling=_LLAMA31_ROPE, bos_token_id=2046, eos_token_id=2047,
    ),
}
# The seed's MODEL_SIZE values.
PRESET_ALIASES = {"8B": "llama3.1-8b", "70B": "llama3.1-70b", "405B": "llama3.1-405b", "1B": "llama3.2-1b",
                  "3B": "llama3.2-3b", "tiny-debug": "tiny"}


def preset(name: str) -> LlamaConfig:
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        known = ", ".join(sorted([*PRESETS, *PRESET_ALIASES]))
        raise LlamatronError(f"unknown model preset {name!r}; choose one of: {known}, or a HF model directory")
    return PRESETS[key]


def _rope_fields(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either transformers>=5 `rope_parameters` or the older keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = params if rope_type not in (None, "default") else None
        return float(theta), scaling
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(hf.get("rope_theta", 10000.0)), scaling


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """Build a LlamaConfig from a HF LlamaForCausalLM config dict; refuse what we cannot run exactly."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        found = model_type or (archs[0] if archs else "unknown")
        raise LlamatronError(
            f"{source}: not a Llama model (model_type={found!r}); llamatron supports LlamaForCausalLM checkpoints"
        )
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu/SwiGLU is supported)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (Llama 3 has no biases)")
    theta, scaling = _rope_fields(hf)
    rope_scaling = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            problems.append(f"rope scaling type {rope_type!r} (only 'llama3' or none is supported)")
        else:
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
            )
    if problems:
        raise LlamatronError(f"{source}: unsupported Llama variant: " + "; ".join(problems))
    try:
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim")
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=None if head_dim is None or int(head_dim) == hidden // num_heads else int(head_dim),
            ffn_hidden_size=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
    except KeyError as missing:
        raise LlamatronError(f"{source}: missing required field {missing}") from None


def to_hf_config(config: LlamaConfig, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """A LlamaForCausalLM config dict. Both rope spellings are written: transformers>=5 reads
    `rope_parameters`, older releases read `rope_theta`/`rope_scaling`, and each ignores the other."""
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if scaling is not None:
        rope_parameters = {**scaling, "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
