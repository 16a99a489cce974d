"""Pipeline parallelism with torch.distributed.pipelining: the layer split, the stages and their
schedule, and what a pipeline changes around them (the gradient norm, tied embeddings, evaluation).

Layout. The model's layers are cut into pp * virtual_pipeline consecutive virtual stages (evenly, or
by parallel.pp_layers); virtual stage s runs on pipeline rank s % pp, the placement interleaved 1F1B
expects, so with virtual_pipeline=v rank r holds stages r, r+pp, ..., r+(v-1)*pp. The embedding lives
on stage 0; the final norm, the output layer and so the loss on the last stage. v=1 runs Schedule1F1B,
v>1 ScheduleInterleaved1F1B (Megatron's virtual pipeline, the seed's MP_VP).

Every stage is the plain Llama with the parts it does not own set to None (its forward then takes and
returns hidden states). Layers keep their global index as their name, so a stage's state dict holds
the same keys as the whole model's: DCP checkpoints do not depend on the layout.

Order (DESIGN section 1): split_model runs first, on the plain model; TP, AC and FSDP are then applied
to each stage module as to a whole model; build_schedule wraps the parallelised stages last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from llamatron.errors import LlamatronError
from llamatron.model.llama import Llama


# ---- the split (pure) ---------------------------------------------------------------------------
def stage_layer_counts(num_layers: int, *, stages: int, pp_layers: Sequence[int] | None = None) -> list[int]:
    """Layers per virtual stage, in model order: `pp_layers` as given, or an even split."""
    found = split_problems(num_layers, stages=stages, pp_layers=pp_layers)
    if found:
        raise LlamatronError("; ".join(found))
    return list(pp_layers) if pp_layers is not None else [num_layers // stages] * stages


def split_problems(num_layers: int, *, stages: int, pp_layers: Sequence[int] | None) -> list[str]:
    if pp_layers is None:
        if num_layers % stages:
            return [
                f"the model's {num_layers} layers do not split evenly into pp*virtual_pipeline = {stages} stages; "
                f"choose degrees whose product divides {num_layers}, or give per-stage counts with parallel.pp_layers"
            ]
        return []
    found = []
    if len(pp_layers) != stages:
        found.append(
            f"parallel.pp_layers has {len(pp_layers)} counts but needs one per virtual stage, "
            f"pp*virtual_pipeline = {stages}"
        )
    if any(count < 1 for count in pp_layers):
        found.append(f"parallel.pp_layers {list(pp_layers)}: every stage needs at least one layer")
    if sum(pp_layers) != num_layers:
        found.append(f"parallel.pp_layers {list(pp_layers)} sums to {sum(pp_layers)}, but the model has {num_layers} layers")
    return found


def stage_indices(pp_rank: int, *, pp: int, virtual_pipeline: int = 1) -> list[int]:
    """The virtual stages pipeline rank `pp_rank` runs, in model order (the "loop" placement)."""
    return [pp_rank + chunk * pp for chunk in range(virtual_pipeline)]


def pp_problems(
    *, num_layers: int, pp: int, virtual_pipeline: int, pp_layers: Sequence[int] | None, microbatches: int | None
) -> list[str]:
    """Every reason the pipeline layout cannot run. `microbatches` is the micro-batch count per step of one
    pipeline (global batch / (micro batch * data-parallel size)); None skips the schedule's rules."""
    found = []
    if virtual_pipeline < 1:
        return [f"parallel.virtual_pipeline must be >= 1, got {virtual_pipeline}"]
    if virtual_pipeline > 1 and pp == 1:
        found.append(
            f"parallel.virtual_pipeline={virtual_pipeline} needs parallel.pp > 1 (virtual stages interleave over "
            "pipeline ranks); set pp or use virtual_pipeline=1"
        )
    if pp == 1 and pp_layers is None:
        return found
    found += split_problems(num_layers, stages=pp * virtual_pipeline, pp_layers=pp_layers)
    if pp == 1 or microbatches is None:
        return found
    fix = "raise training.global_batch_size or lower training.micro_batch_size"
    if virtual_pipeline == 1 and microbatches < pp:
        found.append(
            f"the 1F1B pipeline schedule needs at least pp={pp} micro-batches per step, but each pipeline gets "
            f"{microbatches} (global batch / (micro batch x data-parallel size)); {fix}"
        )
    if virtual_pipeline > 1 and microbatches % pp:
        found.append(
            f"the interleaved pipeline schedule (virtual_pipeline={virtual_pipeline}) needs a multiple of pp={pp} "
            f"micro-batches per step, but each pipeline gets {microbatches} (global batch / (micro batch x "
            f"data-parallel size)); {fix}"
        )
    return found


# ---- stage modules ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PipelineSplit:
    """This rank's share of the model."""

    stages: list[Llama]
    """The virtual stages this rank runs, in model order (each a Llama with some parts None)."""
    indices: list[int]
    """Their virtual stage numbers."""
    num_stages: int
    rank_model: Llama
    """Every part of this rank in one module (the stages' own modules, shared): its parameters and state
    dict are this rank's, under their global names. The optimizer and checkpoints use it; it never runs."""
    tied: bool = False
    """Tied embeddings split over the first and the last stage (see split_model)."""

    @property
    def has_first(self) -> bool:
        return self.indices[0] == 0

    @property
    def has_last(self) -> bool:
        return self.indices[-1] == self.num_stages - 1

    @property
    def tied_copy(self) -> nn.Parameter | None:
        """The last stage's copy of a tied embedding (its output layer's weight), looked up each time:
        FSDP and TP replace parameters."""
        return self.stages[-1].lm_head.weight if self.tied and self.has_last else None

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """This rank's copy of a tied embedding: the embedding on the first stage, the output layer on the
        last, None on the others."""
        if not self.tied:
            return None
        return self.stages[0].embed_tokens.weight if self.has_first else self.tied_copy


def split_model(
    model: Llama, *, pp_rank: int, pp: int, virtual_pipeline: int = 1, pp_layers: Sequence[int] | None = None
) -> PipelineSplit:
    """Cut `model` into its virtual stages and keep this rank's. The stages take over `model`'s modules
    (no copies), so drop `model` afterwards to free the parts other ranks own.

    Tied embeddings (Llama 3.2 1B/3B) span the first and the last stage. As Megatron does, the last
    stage holds a copy of the embedding as its output layer, starting equal; sync_tied_grads sums the
    two gradients every step, so both copies take identical optimizer steps and stay equal."""
    config = model.config
    num_stages = pp * virtual_pipeline
    counts = stage_layer_counts(config.num_layers, stages=num_stages, pp_layers=pp_layers)
    starts = [sum(counts[:s]) for s in range(num_stages)]
    indices = stage_indices(pp_rank, pp=pp, virtual_pipeline=virtual_pipeline)
    tied = config.tie_word_embeddings and num_stages > 1
    stages = []
    for index in indices:
        first, last = index == 0, index == num_stages - 1
        lm_head = model.lm_head if last else None
        if last and tied:
            lm_head = _untied_output_layer(model)
        layers = {str(i): model.layers[str(i)] for i in range(starts[index], starts[index] + counts[index])}
        stages.append(_shell(
            config, embed_tokens=model.embed_tokens if first else None, layers=layers,
            norm=model.norm if last else None, lm_head=lm_head,
        ))
    rank_model = stages[0]
    if len(stages) > 1:
        rank_model = _shell(
            config, embed_tokens=stages[0].embed_tokens,
            layers={name: block for stage in stages for name, block in stage.layers.items()},
            norm=stages[-1].norm, lm_head=stages[-1].lm_head,
        )
    return PipelineSplit(stages=stages, indices=indices, num_stages=num_stages, rank_model=rank_model, tied=tied)


def _shell(config, *, embed_tokens, layers: dict[str, nn.Module], norm, lm_head) -> Llama:
    """A Llama holding the given modules (None for a part it lacks). Built on the meta device, so the
    modules it starts with cost nothing before they are replaced."""
    with torch.device("meta"):
        shell = Llama(config)
    shell.embed_tokens = embed_tokens
    shell.layers = nn.ModuleDict(layers)
    shell.norm = norm
    shell.lm_head = lm_head
    return shell


def _untied_output_layer(model: Llama) -> nn.Linear:
    weight = model.embed_tokens.weight
    with torch.device("meta"):
        lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    lm_head.weight = nn.Parameter(weight.detach().clone())
    return lm_head


# ---- the schedule -------------------------------------------------------------------------------
def build_schedule(
    split: PipelineSplit,
    *,
    pp_group: dist.ProcessGroup,
    device: torch.device,
    microbatches: int,
    input_shape: tuple[int, int],
    hidden_dtype: torch.dtype,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sequence_shards: int = 1,
):
    """The stages (after TP/AC/FSDP) in their schedule: 1F1B for one stage per rank, interleaved 1F1B
    for several. `input_shape` is one micro-batch's (batch, seq); between stages a rank's hidden state
    holds seq / sequence_shards positions (tp with sequence parallelism: each tp rank sends its part to
    its peer of the next stage, as Megatron does). The activations' shapes are given up front (static
    metadata), so the schedule never runs a trial forward to infer them.

    The schedule calls loss_fn(last stage output, target) per micro-batch and backpropagates what it
    returns; it scales nothing itself (scale_grads=False): the caller's loss carries the normalisation."""
    batch, seq = input_shape
    # requires_grad: the hidden states' gradients travel back between the stages.
    hidden = torch.empty(batch, seq // sequence_shards, split.stages[0].config.hidden_size, dtype=hidden_dtype,
                         device="meta", requires_grad=True)
    tokens = torch.empty(*input_shape, dtype=torch.long, device="meta")
    stages = []
    for module, index in zip(split.stages, split.indices, strict=True):
        # The last stage's output only feeds the loss, never a send: its metadata is not used, and under
        # tensor parallelism it is a vocabulary-sharded DTensor that a plain placeholder stands in for.
        stages.append(PipelineStage(
            module, index, split.num_stages, device, group=pp_group,
            input_args=(tokens if index == 0 else hidden,), output_args=(hidden,),
        ))
    if len(stages) == 1:
        return Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)


# ---- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def forward_only(
    split: PipelineSplit, *, pp_group: dist.ProcessGroup, tokens: torch.Tensor, hidden_dtype: torch.dtype,
    sequence_shards: int = 1, **kwargs: torch.Tensor,
) -> torch.Tensor | None:
    """One micro-batch through every stage, stage after stage (validation needs no overlap): returns the
    last stage's output (logits) on the rank that runs it, None elsewhere. Every rank of the pipeline
    calls this with the same batch; `kwargs` (positions, document_ids) go to every stage. The hidden
    states between stages hold seq / sequence_shards positions (see build_schedule).

    The blocking sends and receives follow the stage order on every rank, so they always meet."""
    pp = pp_group.size()
    batch, seq = tokens.shape
    hidden_shape = (batch, seq // sequence_shards, split.stages[0].config.hidden_size)
    output = None
    for module, index in zip(split.stages, split.indices, strict=True):
        if index == 0:
            inputs = tokens
        else:
            inputs = torch.empty(hidden_shape, dtype=hidden_dtype, device=tokens.device)
            dist.recv(inputs, src=dist.get_global_rank(pp_group, (index - 1) % pp), group=pp_group)
        output = module(inputs, **kwargs)
        if index < split.num_stages - 1:
            dist.send(output.contiguous(), dst=dist.get_global_rank(pp_group, (index + 1) % pp), group=pp_group)
            output = None
    return output


# ---- gradients ----------------------------------------------------------------------------------
def clip_grad_norm_(
    parameters: Iterable[nn.Parameter],
    max_norm: float,
    *,
    pp_group: dist.ProcessGroup | None = None,
    exclude_from_norm: Iterable[nn.Parameter] = (),
) -> torch.Tensor:
    """Clip to a total 2-norm over the whole model: each stage's norm (DTensor gradients already
    reduce over their data- and tensor-parallel mesh) is squared, summed over the pipeline ranks and
    rooted, as torchtitan and Megatron do. `exclude_from_norm` are clipped but not counted (the tied
    embedding's second copy, whose gradient equals the first's). Returns the norm before clipping, a 0-dim
    tensor on the gradients' device (reading it waits for the GPU: the trainer does so once the step is queued)."""
    parameters = [p for p in parameters if p.grad is not None]
    excluded = {id(p) for p in exclude_from_norm}
    grads = [p.grad for p in parameters if id(p) not in excluded]
    if grads:
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    else:
        total = torch.zeros((), device=parameters[0].grad.device if parameters else "cpu")
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_group is not None and pp_group.size() > 1:
        total = total.float() ** 2
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


def tied_embedding_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """The group of this rank and its counterpart holding the other copy of a tied embedding: the first
    and the last pipeline rank with the same (dp, cp, tp) coordinates (Megatron's embedding group).
    Collective: every rank of the job calls it. None on ranks in neither end of the pipeline."""
    ranks = mesh.mesh  # (pp, dp, cp, tp) global ranks
    pp = ranks.shape[0]
    mine = None
    for line in ranks.reshape(pp, -1).T.tolist():  # one pipeline per column
        pair = [line[0], line[-1]]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine


def sync_tied_grads(split: PipelineSplit, group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of the two copies of a tied embedding (first stage: the embedding; last stage:
    the output layer), so each holds the gradient the single shared matrix would. Both copies are
    sharded alike (same shape, same mesh), so their local shards line up."""
    param = split.tied_weight
    if group is None or param is None:
        return
    grad = param.grad
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    dist.all_reduce(local, group=group)
