"""Tensor parallelism (and sequence parallelism) with DTensor plans applied to the plain model.

The plans follow Megatron's split, expressed as DTensor placements on the "tp" mesh axis:
- q/k/v, gate, up: column parallel (each rank owns whole heads / a slice of the ffn);
- o_proj, down_proj: row parallel, so a block's two matmuls need one reduction each;
- embed_tokens: row parallel over the vocabulary; lm_head: column parallel over the vocabulary, its
  logits left sharded on the vocabulary when the loss is vocabulary-parallel (loss_parallel.py);
- norms: with sequence parallelism they run on a 1/tp slice of the sequence (the residual stream is
  sharded on dim 1 between blocks, and the row-parallel outputs reduce-scatter instead of all-reduce);
  without it they run replicated on the whole sequence.
The model code is unchanged: its views use -1 for the local head count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llamatron.model.config import LlamaConfig
from llamatron.model.llama import Llama


def tp_problems(config: LlamaConfig, tp: int) -> list[str]:
    """Every reason `config` cannot be split `tp` ways (empty when it can)."""
    if tp <= 1:
        return []
    found = []
    if tp > config.num_kv_heads:
        found.append(
            f"parallel.tp={tp} is above the model's {config.num_kv_heads} KV heads (each rank needs whole KV "
            f"heads); use tp <= {config.num_kv_heads}"
        )
    sizes = {
        "attention heads": config.num_heads, "KV heads": config.num_kv_heads,
        "ffn hidden size": config.ffn_hidden_size, "vocabulary size": config.vocab_size,
    }
    for what, size in sizes.items():
        if size % tp:
            found.append(f"the model's {what} ({size}) is not divisible by parallel.tp={tp}; choose a tp dividing it")
    return found


def sequence_problems(lengths: dict[str, int], tp: int) -> list[str]:
    """Sequence parallelism splits every row's positions evenly over the tp ranks: each named length
    (a config field -> its value) must divide by tp."""
    return [
        f"{name}={length} is not divisible by parallel.tp={tp} (sequence parallelism splits the sequence "
        f"evenly); use a multiple of {tp} or parallel.sequence_parallel=false"
        for name, length in lengths.items() if length % tp
    ]


class ReplicateParallel(ParallelStyle):
    """Parameters become Replicate DTensors on the tp mesh while inputs and outputs stay local tensors.

    Used for the norms without sequence parallelism: they compute the same thing on every rank, but
    as DTensors they share the other parameters' mesh, so FSDP and gradient clipping see one layout."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_module, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False) for x in inputs)

        def to_local(_module, output, _mesh):
            return output.to_local()

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=to_local)


def block_plan(*, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of one TransformerBlock, keyed by module name within the block."""
    colwise = {name: ColwiseParallel() for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    if not sequence_parallel:
        return {
            "input_layernorm": ReplicateParallel(), "post_attention_layernorm": ReplicateParallel(), **colwise,
            "self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel(),
        }
    return {
        "input_layernorm": SequenceParallel(),
        # Attention and the MLP need the whole sequence: all-gather the norm's sequence shards.
        # Attention's cos and sin arrive as plain tensors (None: left as they are).
        "self_attn": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        **colwise,
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def root_plan(model: Llama, *, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of the modules outside the blocks (a pipeline stage may lack some of them)."""
    stream = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if model.embed_tokens is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if model.norm is not None:
        plan["norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    if model.lm_head is not None:
        # Vocabulary-parallel loss: logits stay a DTensor sharded on the vocabulary, never gathered.
        plan["lm_head"] = ColwiseParallel(
            input_layouts=stream,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    return plan


def apply_tp(model: Llama, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    """Shard `model` in place over the 1-D `tp_mesh`. With loss_parallel the model returns logits as a
    DTensor sharded on the vocabulary (llamatron.parallel.loss_parallel computes the loss from it);
    without, full logits as a plain tensor. Positions and document_ids stay whole on every rank."""
    if tp_mesh.size() == 1:
        return
    problems = tp_problems(model.config, tp_mesh.size())
    assert not problems, problems  # the trainer refuses these before building anything
    # A later pipeline stage (no embedding) receives the previous stage's output as it left that tp rank:
    # with sequence parallelism this rank's part of the sequence, which its first norm takes as it is.
    parallelize_module(model, tp_mesh, root_plan(model, sequence_parallel=sequence_parallel,
                                                 loss_parallel=loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel=sequence_parallel))
    # Distributing the embedding and the output layer replaced their weights separately; share again.
    model.tie_weights()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a plain tensor is returned as it is)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
