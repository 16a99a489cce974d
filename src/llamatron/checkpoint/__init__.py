"""Checkpoint formats and conversions: HF safetensors (hf), Megatron-Core (mcore, keymaps, convert),
training checkpoints (dcp), export and verification. Import the module you need: this package imports
nothing itself, so light users (atomic writes from the data tools) do not load torch."""
