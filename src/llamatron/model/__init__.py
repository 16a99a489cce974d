from llamatron.model.config import PRESETS, LlamaConfig, RopeScaling, from_hf_config, preset, to_hf_config
from llamatron.model.kv_cache import KVCache
from llamatron.model.llama import Llama, build_model

__all__ = [
    "PRESETS", "KVCache", "Llama", "LlamaConfig", "RopeScaling", "build_model", "from_hf_config", "preset",
    "to_hf_config",
]
