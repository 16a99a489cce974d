"""Training data: Megatron indexed datasets and the samples read from them.

indexed      MMIDIDX .bin/.idx reader and writer (byte-compatible with megatron-core)
gpt_sampler  pretraining samples in Megatron GPTDataset's order; the data-parallel sampler
blend        weighted blends (--data-path 0.3 A 0.7 B) and per-split dataset building
preprocess   text corpora -> indexed datasets (readers: the input formats)
sft*, packing, chat: supervised fine-tuning data
"""
