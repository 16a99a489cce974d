"""The train and validation sample sequences of a job, from its data section.

Pretraining reads Megatron indexed datasets in GPTDataset's order (blends included); SFT reads raw
JSON records or an SFT idxmap. Either way the trainer sees a map-style dataset whose item i is sample i
of the global order; llamatron.train.batching decides which rank reads which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamatron.config.job import JobConfig
from llamatron.errors import LlamatronError
from llamatron.train.batching import SampleDataset


@dataclass(kw_only=True)
class TrainData:
    train: SampleDataset
    valid: SampleDataset | None


def _train_sample_count(config: JobConfig) -> int:
    t = config.training
    iters = t.train_iters if t.train_iters is not None else t.train_tokens // (t.global_batch_size * t.seq_len)
    return iters * t.global_batch_size


def _valid_sample_count(config: JobConfig, *, dp_size: int) -> int:
    return config.training.eval_iters * config.training.micro_batch_size * dp_size


def _pretrain_split(
    config: JobConfig, paths: list[str], *, split: str, which: str, num_samples: int
) -> SampleDataset:
    from llamatron.data.blend import build_blended_dataset

    return build_blended_dataset(
        paths, seq_len=config.training.seq_len, seed=config.training.seed, split=split,
        which=which, num_samples=num_samples,
    )


def _pretrain_data(config: JobConfig, *, dp_size: int) -> TrainData:
    d = config.data
    train = _pretrain_split(
        config, d.data_path, split=d.split, which="train", num_samples=_train_sample_count(config)
    )
    valid = None
    if config.training.eval_interval:
        n_valid = _valid_sample_count(config, dp_size=dp_size)
        if d.valid_data_path:
            # A separate validation corpus is used whole, as Megatron's --valid-data-path.
            valid = _pretrain_split(config, d.valid_data_path, split="100,0,0", which="train", num_samples=n_valid)
        else:
            valid = _pretrain_split(config, d.data_path, split=d.split, which="valid", num_samples=n_valid)
    return TrainData(train=train, valid=valid)


def _sft_data(config: JobConfig) -> TrainData:
    from llamatron.data.sft import build_sft_dataset

    d, t = config.data, config.training
    common = dict(
        fmt=d.sft_format, tokenizer=config.model.tokenizer, seq_len=d.pad_len or t.seq_len,
        packing=d.packing, seed=t.seed, format=d.sft_record_format, train_on_prompt=d.train_on_prompt,
        train_turns=d.train_turns, default_system=d.default_system, truncate=d.truncate,
        on_error="skip" if d.on_error == "skip" else "raise",
    )
    if len(d.data_path) != 1:
        raise LlamatronError(f"SFT takes one data file or idxmap prefix in data.data_path, got {d.data_path}")
    train = build_sft_dataset(d.data_path[0], **common)
    valid = None
    if config.training.eval_interval and d.valid_data_path:
        valid = build_sft_dataset(d.valid_data_path[0], **common)
    return TrainData(train=train, valid=valid)


def build_train_data(config: JobConfig, *, dp_size: int) -> TrainData:
    for path in [*config.data.data_path, *config.data.valid_data_path]:
        if Path(path).suffix in (".json", ".jsonl") and not Path(path).exists():
            raise LlamatronError(f"data file {path} does not exist")
    if config.data.kind == "sft":
        return _sft_data(config)
    return _pretrain_data(config, dp_size=dp_size)
