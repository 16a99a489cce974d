"""Which samples each rank trains on at each step, in Megatron's order, and their collation.

The global batch of step s is samples [consumed, consumed + global_batch) of the dataset's order.
It is cut into micro-batch rounds of micro_batch * dp samples; in each round rank r takes the r-th
contiguous run of micro_batch samples (Megatron's MegatronPretrainingSampler). The position is one
number, `consumed_samples`, so resuming at another data-parallel size continues the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

IGNORE_INDEX = -100


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass(kw_only=True, frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def problems(self) -> list[str]:
        per_round = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_round:
            return [
                f"global batch {self.global_batch_size} is not divisible by micro batch {self.micro_batch_size} "
                f"x data-parallel size {self.dp_size}; change --training.global_batch_size or the process count"
            ]
        return []

    def rank_indices(self, consumed_samples: int) -> list[list[int]]:
        """This rank's sample indices for the step starting at `consumed_samples`, per micro-batch."""
        per_round = self.micro_batch_size * self.dp_size
        micro = []
        for round_index in range(self.grad_accum_steps):
            start = consumed_samples + round_index * per_round + self.dp_rank * self.micro_batch_size
            micro.append(list(range(start, start + self.micro_batch_size)))
        return micro


def collate(samples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stack samples into a micro-batch of `tokens`, `labels` (IGNORE_INDEX where no loss) and, when the
    samples carry them, `positions` and `document_ids`.

    A pretraining sample is an array of seq_len + 1 token ids (inputs and the shifted targets); an SFT
    sample is a mapping with at least `tokens` and `labels` already aligned (labels[i] is the target of
    tokens[i])."""
    first = samples[0]
    if isinstance(first, dict):
        batch = {}
        for key in first:
            batch[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples]).long()
        return batch
    stacked = torch.as_tensor(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
    return {"tokens": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous()}
