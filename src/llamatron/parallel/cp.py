"""Context parallelism: the sequence of every micro-batch split over the "cp" ranks, attention by ring.

Each cp rank holds a load-balanced slice of the sequence (shard_batch: chunks r and 2*cp-1-r of 2*cp,
so causal attention costs every rank the same) and runs the whole model on it: everything but
attention is per position, and attention (apply_cp) becomes ring attention, which brings the other
ranks' keys and values by (parallel/ring_attention.py). RoPE takes the real positions of the slice
and packed samples keep their document boundaries (the ids travel with the keys).

Parameters are replicated over cp, so gradients are summed over dp x cp (the "dp_cp" mesh that FSDP
shards over); the cp ranks of one data-parallel rank read the same samples and each computes the loss
of its own positions.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from llamatron.model.llama import Llama
from llamatron.parallel.ring_attention import ring_attention


def cp_problems(lengths: dict[str, int], *, cp: int, tp: int = 1, sequence_parallel: bool = False) -> list[str]:
    """Every named sequence length (a config field -> its value) must split into 2*cp equal chunks, and,
    with sequence parallelism, a rank's slice (length / cp) further into tp equal parts."""
    if cp <= 1:
        return []
    found = []
    for name, length in lengths.items():
        if length % (2 * cp):
            found.append(
                f"{name}={length} is not divisible by 2*parallel.cp={2 * cp} (context parallelism cuts the sequence "
                f"into 2*cp equal chunks); use a multiple of {2 * cp}"
            )
        elif sequence_parallel and (length // cp) % tp:
            found.append(
                f"{name}={length} does not split over parallel.cp={cp} x parallel.tp={tp} with sequence parallelism "
                f"(each cp rank's {length // cp} positions are split tp ways); use a multiple of {math.lcm(2, tp) * cp}"
            )
    return found


def zigzag_indices(seq_len: int, *, cp_rank: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions rank `cp_rank` holds: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size.
    (seq_len / cp_size,) int64, increasing."""
    assert seq_len % (2 * cp_size) == 0, (seq_len, cp_size)  # refused earlier by cp_problems
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk, device=device)])


def shard_batch(batch: dict[str, torch.Tensor], *, cp_rank: int, cp_size: int) -> dict[str, torch.Tensor]:
    """This cp rank's slice of a micro-batch: every (batch, seq) entry (tokens, labels, positions,
    document_ids, loss weights, ...) cut on the sequence dim at zigzag_indices. `positions` is added
    (0..seq-1 per row) when the batch has none: RoPE needs each token's real position."""
    tokens = batch["tokens"]
    rows, seq = tokens.shape[:2]
    if cp_size == 1:
        return batch
    index = zigzag_indices(seq, cp_rank=cp_rank, cp_size=cp_size, device=tokens.device)
    full = dict(batch)
    if full.get("positions") is None:
        full["positions"] = torch.arange(seq, device=tokens.device).expand(rows, seq)
    sliced = {}
    for key, value in full.items():
        if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, seq)):
            raise ValueError(f"batch entry {key!r} of shape {tuple(getattr(value, 'shape', ()))} is not (batch, seq)")
        sliced[key] = value.index_select(1, index)
    return sliced


class RingAttentionCore:
    """The attention core (see llamatron.model.llama.SDPAttention) as ring attention over a cp group:
    the layers pass it the document ids themselves instead of a dense mask of the local slice."""

    def __init__(self, group: dist.ProcessGroup, *, fused: bool = True) -> None:
        self.group, self.fused = group, fused

    def mask(
        self, document_ids: torch.Tensor | None, *, start: int, seq: int, device: torch.device, cached: bool
    ) -> torch.Tensor | None:
        del start, seq, device  # positions come from shard_batch; the ring knows the chunk layout
        if cached:
            raise ValueError("context parallelism is for training: no KV cache")
        return document_ids

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None) -> torch.Tensor:
        return ring_attention(q, k, v, group=self.group, document_ids=mask, fused=self.fused)


def apply_cp(model: Llama, cp_mesh: DeviceMesh, *, fused: bool = True) -> None:
    """Make every attention layer of `model` ring attention over the 1-D `cp_mesh` (nothing at size 1).
    The model must then be fed shard_batch slices (with their positions)."""
    if cp_mesh.size() == 1:
        return
    model.set_attention_core(RingAttentionCore(cp_mesh.get_group(), fused=fused))
