"""llamatron: PyTorch-native LLaMA 3.x training, conversion and evaluation, Megatron-Core compatible."""

__version__ = "0.1.0"
