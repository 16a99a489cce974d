"""What a training step under pipeline parallelism needs beside parallel/pp.py: the last stage's loss
(as the step without a pipeline computes it), the per-micro-batch fields that reach it, and the layout
checks that need the job's config.

The schedule hands its loss function one tensor per micro-batch (the "target"), cut from one tensor of
the whole step, so the labels and what the loss needs beside them (document ids for the seed's
per-sample SFT loss, a cp slice's loss weights) travel stacked in one float64 tensor: it holds token
ids (< 2^53) and fp32 weights exactly.
"""

from __future__ import annotations

import torch

from llamatron.config.job import JobConfig
from llamatron.parallel.pp import pp_problems
from llamatron.train.cp_batch import slice_loss_parts
from llamatron.train.loss import loss_parts
from llamatron.train.precision import LossScaler

TARGET_FIELDS = ("labels", "document_ids", "loss_weights")
_TARGET_DTYPES = {"labels": torch.long, "document_ids": torch.long, "loss_weights": torch.float32}


class PipelineLoss:
    """The schedule's loss_fn: on the last stage, each micro-batch's loss exactly as the step without a
    pipeline computes it (numerator / the global batch's count), recorded for the log; it returns what is
    backpropagated (times the ranks FSDP averages gradients over, fp16-scaled). `start` sets each step's
    normalisation before the schedule runs."""

    def start(
        self, *, kind: str, global_count: torch.Tensor, grad_ranks: int, scaler: LossScaler, fields: list[str]
    ) -> None:
        """global_count: the step's loss denominator, a 0-dim device tensor floored at 1."""
        self.kind, self.global_count, self.grad_ranks, self.scaler = kind, global_count, grad_ranks, scaler
        self.fields = fields  # what the target holds (see pack_target)
        self.losses: list[torch.Tensor] = []  # 0-dim, on the device: read once the step is queued

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mb = unpack_target(target, self.fields)
        if "loss_weights" in mb:  # a cp slice (train/cp_batch.py)
            numerator, _ = slice_loss_parts(logits, mb)
        else:
            numerator, _ = loss_parts(logits, mb["labels"], kind=self.kind, document_ids=mb.get("document_ids"))
        loss = numerator / self.global_count
        self.losses.append(loss.detach().double())
        return self.scaler.scale(loss * self.grad_ranks)

    def total(self, *, device: torch.device) -> torch.Tensor:
        """The sum of this step's micro-batch losses, 0-dim fp64 on `device` (0 on a rank without the last stage)."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for loss in self.losses:
            total += loss
        return total


def target_fields(batch: dict[str, torch.Tensor]) -> list[str]:
    return [field for field in TARGET_FIELDS if field in batch]


def pack_target(batch: dict[str, torch.Tensor], fields: list[str]) -> torch.Tensor:
    """The (batch, seq) `fields` of `batch` stacked on a last dim in float64. (batch, seq, len(fields))."""
    return torch.stack([batch[field].to(torch.float64) for field in fields], dim=-1)


def unpack_target(target: torch.Tensor, fields: list[str]) -> dict[str, torch.Tensor]:
    return {field: target[..., i].to(_TARGET_DTYPES[field]) for i, field in enumerate(fields)}


def with_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with explicit positions (0..seq-1 per row where it has none): a later pipeline stage
    cannot count them from its input, a part of the sequence under sequence parallelism."""
    if "positions" in batch:
        return batch
    rows, seq = batch["tokens"].shape
    positions = torch.arange(seq, device=batch["tokens"].device).repeat(rows, 1)  # (batch, seq)
    return {**batch, "positions": positions}


def pipeline_problems(config: JobConfig, *, num_layers: int, dp: int, batch_ok: bool) -> list[str]:
    """The pipeline layout's problems (parallel/pp.py's pp_problems) for this job, and the stages' block
    counts against activation_checkpoint=full. `batch_ok`: the batch splits over the data-parallel ranks
    (else the schedules' micro-batch rules are not checked)."""
    p, t = config.parallel, config.training
    # The schedule's micro-batches are one pipeline's share of the global batch (its gradient accumulation).
    microbatches = t.global_batch_size // (t.micro_batch_size * dp) if batch_ok else None
    found = pp_problems(num_layers=num_layers, pp=p.pp, virtual_pipeline=p.virtual_pipeline, pp_layers=p.pp_layers,
                        microbatches=microbatches)
    if p.pp > 1 and p.activation_checkpoint == "full" and not found:
        counts = p.pp_layers or [num_layers // (p.pp * p.virtual_pipeline)] * (p.pp * p.virtual_pipeline)
        if any(count % p.ac_layers for count in counts):
            found.append(
                f"activation_checkpoint=full checkpoints groups of parallel.ac_layers={p.ac_layers} blocks, but the "
                f"pipeline stages have {counts} blocks; choose ac_layers dividing every stage's count"
            )
    return found
