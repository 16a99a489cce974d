from llamatron.checkpoint.hf import (
    HFCheckpointReader,
    HFCheckpointWriter,
    hf_name,
    internal_name,
    load_hf_model,
    save_hf_model,
)

__all__ = [
    "HFCheckpointReader", "HFCheckpointWriter", "hf_name", "internal_name", "load_hf_model", "save_hf_model",
]
