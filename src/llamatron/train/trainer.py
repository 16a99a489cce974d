"""The training loop: fetch batch -> forward -> loss -> backward -> clip -> step -> log.

Every rank runs `train(config)`. The model is built plain, initial weights loaded, parallelism
applied by llamatron.parallel, then the loop runs until train_iters, saving every save_interval and
on SIGTERM.

On a GPU the host runs a step ahead of the device: it queues a step, then reads the previous step's figures
(loss, grad norm, skipped or not, stop requested) while the new one runs, so the GPU never waits at a step
boundary for logging and the next batch. Where the host acts on the state after a step (a checkpoint,
evaluation, a profile's end, the last step) it reads that step first and queues nothing else. On the CPU
each step is read as soon as it is computed.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from llamatron.checkpoint.dcp import is_run_checkpoint, resolve_checkpoint
from llamatron.config.job import JobConfig
from llamatron.config.load import to_dict
from llamatron.errors import LlamatronError, collect_problems
from llamatron.model import Llama
from llamatron.parallel.ac import apply_ac
from llamatron.parallel.attention_backend import AttentionShape, agree_across_ranks, select_attention_backend
from llamatron.parallel.compile import apply_compile
from llamatron.parallel.cp import apply_cp, cp_problems
from llamatron.parallel.fp8 import apply_fp8
from llamatron.parallel.fsdp import apply_fsdp
from llamatron.parallel.mesh import ParallelDims, build_mesh, fsdp_mesh
from llamatron.parallel.offload import offload_optimizer
from llamatron.parallel.pp import (
    PipelineSplit,
    build_schedule,
    clip_grad_norm_,
    forward_only,
    split_model,
    sync_tied_grads,
    tied_embedding_group,
)
from llamatron.parallel.tp import apply_tp, sequence_problems, tp_problems
from llamatron.train import checkpointing as ckpt
from llamatron.train.batching import BatchPlan, collate
from llamatron.train.cp_batch import cp_slice, slice_loss_parts
from llamatron.train.data import TrainData, build_train_data
from llamatron.train.distributed import DistEnv, host_threads_for, init_distributed
from llamatron.train.fused_loss import fused_loss_parts, use_fused_loss
from llamatron.train.loss import LabelSelection, count_units, label_selection, loss_parts
from llamatron.train.metrics import (
    MetricsWriter,
    Throughput,
    allocator_retries,
    device_peak_tflops,
    flops_per_token,
    peak_memory_gib,
)
from llamatron.train.optim import LRSchedule, build_optimizer, set_lr, skips_on_device, step_unless
from llamatron.train.pipeline import (
    PipelineLoss,
    pack_target,
    pipeline_problems,
    target_fields,
    with_positions,
)
from llamatron.train.precision import LossScaler, compute_dtype
from llamatron.train.profiling import StepProfiler
from llamatron.train.run_dir import RunDir, resolve_schedule
from llamatron.train.setup import build_model_for_training, resolve_model_config


@dataclass(kw_only=True)
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    skipped: bool
    stop_requested: bool


@dataclass(kw_only=True)
class QueuedStep:
    """A step whose update is queued on the device: what the host knew when it queued it, and its figures
    (loss, grad norm, skipped, stop requested) as one fp64 device tensor, read by `resolve` (which waits)."""

    iteration: int
    consumed_samples: int
    consumed_tokens: int
    lr: float
    loss_scale: float | None
    tokens: int
    values: torch.Tensor
    ended: torch.cuda.Event | None = None  # recorded after the step's last kernel (CUDA), for its timing

    def resolve(self) -> StepResult:
        loss, grad_norm, skipped, stop = self.values.tolist()
        if self.ended is not None:
            self.ended.synchronize()  # queued after `values`: done at most a few kernels later
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=self.tokens, skipped=bool(skipped),
                          stop_requested=bool(stop))


@dataclass(kw_only=True)
class _LoopLog:
    """Where fit's step records go and the rates they report."""

    writer: MetricsWriter | None
    throughput: Throughput
    started: float
    start_iteration: int


class Trainer:
    def __init__(self, config: JobConfig, env: DistEnv) -> None:
        self.config, self.env = config, env
        t, p = config.training, config.parallel
        dims = ParallelDims(world_size=env.world_size, tp=p.tp, pp=p.pp, cp=p.cp)
        collect_problems(layout_problems(config, world_size=env.world_size), what="infeasible configuration")
        self.mesh = build_mesh(dims, device_type=env.device.type)
        self.dp_mesh = self.mesh["dp"]
        # Batch-wide sums (token counts, the logged loss) go over dp only: tp ranks see the same batch.
        self.dp_group = self.dp_mesh.get_group()
        # Context parallelism: the cp ranks of a data-parallel rank read the same samples, each computing a
        # slice of every row; so loss sums go over dp x cp, sample counts over dp, gradients over dp x cp.
        self.cp_mesh = self.mesh["cp"]
        self.loss_group = fsdp_mesh(self.mesh).get_group()
        self.grad_ranks = dims.dp * dims.cp  # FSDP averages gradients over these
        self.run = RunDir(Path(config.output), rank=env.rank)
        self.data: TrainData = build_train_data(config, dp_size=dims.dp)
        self.schedule_info = resolve_schedule(config, data=self.data)
        self.plan = BatchPlan(
            global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            dp_rank=self.dp_mesh.get_local_rank(), dp_size=dims.dp,
        )
        self.attention = self._probe_attention()
        self.model, self.model_config = build_model_for_training(config, device=env.device)
        # The chosen SDPA kernels travel with the blocks (before a pipeline split; cp replaces the core).
        self.model.set_attention_core(self.attention.core())
        # ---- pipeline parallelism: this rank keeps its stages, before any other parallelism ----
        self.pp_group = self.mesh["pp"].get_group()
        self.pipeline: PipelineSplit | None = None
        if p.pp > 1:
            self.pipeline = split_model(self.model, pp_rank=self.mesh["pp"].get_local_rank(), pp=p.pp,
                                        virtual_pipeline=p.virtual_pipeline, pp_layers=p.pp_layers)
            # The rank's own parts under their global names: optimizer, clipping and checkpoints use it.
            self.model = self.pipeline.rank_model
        # The modules that run: the whole model, or this rank's stages (each parallelised as a whole model).
        self.parts = self.pipeline.stages if self.pipeline is not None else [self.model]
        self._pipeline_schedule = None  # built at the first step, from its micro-batch shape
        self._pipeline_loss = PipelineLoss()
        self._tied_group = tied_embedding_group(self.mesh) if self.pipeline is not None and self.pipeline.tied else None
        # ---- end pipeline parallelism ----
        self.fp8 = None
        if t.precision == "fp8":
            tokens = t.micro_batch_size * self.attention.shape.seq
            self.fp8 = apply_fp8(
                self.model, recipe=t.fp8_recipe, device=env.device, tp=p.tp, emulate=t.fp8_emulate,
                fsdp_float8_all_gather=p.distributed_optimizer and dims.dp > 1, pad_inner_dim=tokens % 16 != 0,
            )
        for part in self.parts:
            # The vocabulary-parallel loss (parallel/loss_parallel.py) never gathers full logits.
            apply_tp(part, self.mesh["tp"], sequence_parallel=p.sequence_parallel, loss_parallel=True)
            apply_cp(part, self.cp_mesh)
            apply_ac(part, mode=p.activation_checkpoint, layers=p.ac_layers)
            # Ring attention's point-to-point exchange cannot be traced: under cp the blocks compile around it.
            apply_compile(part, enabled=t.compile, fullgraph=p.cp == 1, mode=t.compile_mode)
            apply_fsdp(part, fsdp_mesh(self.mesh), param_dtype=compute_dtype(t.precision),
                       reduce_dtype=torch.bfloat16 if p.grad_reduce_in_bf16 else torch.float32,
                       shard=config.parallel.distributed_optimizer, reshard_after_forward=p.reshard_after_forward)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.optimizer = offload_optimizer(self.optimizer, mode=p.optimizer_offload, device=env.device)
        self.schedule = LRSchedule(
            max_lr=config.optim.lr, min_lr=config.optim.min_lr, warmup_iters=self.schedule_info.warmup_iters,
            decay_iters=self.schedule_info.decay_iters, style=config.optim.decay_style,
        )
        self.scaler = LossScaler(enabled=t.precision == "fp16")
        self.saver = ckpt.CheckpointSaver(
            self.run.checkpoints, keep_last=config.checkpoint.keep_last, model_config=self.model_config,
            tokenizer=config.model.tokenizer, async_save=config.checkpoint.async_save,
        )
        self.state = ckpt.TrainState()
        self._stop_requested = False

    # ---- resume -------------------------------------------------------------------------------
    def resume_or_init(self) -> None:
        latest = ckpt.latest_checkpoint(self.run.checkpoints)
        # A pipeline's last stage reads its copy of a tied embedding as the embedding where a checkpoint
        # saved without a pipeline has no separate output layer state.
        aliases = {"lm_head.weight": "embed_tokens.weight"} if self.pipeline is not None and self.pipeline.tied else None
        if latest is not None:
            self.state = ckpt.load_checkpoint(latest, model=self.model, optimizer=self.optimizer, aliases=aliases)
            self.run.truncate_metrics(after_iteration=self.state.iteration)
            self.run.log(f"resumed from {latest} at iteration {self.state.iteration}")
        elif self.config.model.init_from and is_run_checkpoint(Path(self.config.model.init_from)):
            source = resolve_checkpoint(Path(self.config.model.init_from))
            if self.config.model.finetune:
                ckpt.load_model_weights(source, model=self.model)
                self.run.log(f"initial weights from {source} (finetune: counters start at zero)")
            else:
                self.state = ckpt.load_checkpoint(source, model=self.model, optimizer=self.optimizer, aliases=aliases)
                self.run.log(f"continuing {source} at iteration {self.state.iteration}")

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> QueuedStep:
        """Queue one optimizer step on the device and advance the counters; the host does not wait for it
        (except where fp16's loss scale or the optimizer offload decide on the host): `fit` reads its
        figures after queuing the next step, so the GPU never idles at a step boundary."""
        micro_batches = [collate([self.data.train[i] for i in indices])
                         for indices in self.plan.rank_indices(self.state.consumed_samples)]
        kind = self._loss_kind()
        # The loss is normalised by the global batch's count (tokens or sequences), summed before
        # backward, so gradients are exact whatever the ranks' shares and the accumulation.
        # Where the fused loss runs, each micro-batch's labelled positions are worked out here once, on the
        # host; their count is the micro-batch's.
        selections = [self._label_selection(mb, kind=kind) for mb in micro_batches]
        local_count = sum(sel.count if sel is not None else count_units(mb["labels"], kind=kind,
                                                                        document_ids=mb.get("document_ids"))
                          for mb, sel in zip(micro_batches, selections, strict=True))
        global_count = self._global_count(local_count)
        if self.pipeline is None:
            loss_sum = self._forward_backward(micro_batches, selections, kind=kind, global_count=global_count)
        else:
            loss_sum = self._pipeline_forward_backward(micro_batches, kind=kind, global_count=global_count)
        tokens = sum(mb["tokens"].numel() for mb in micro_batches)
        self.scaler.unscale_(self.model.parameters())
        grad_norm = self._clip_grad_norm()
        (loss_total,) = self._batch_sum([loss_sum])
        nonfinite = ~(torch.isfinite(loss_total) & torch.isfinite(grad_norm))
        lr = self.schedule.lr_at(self.state.iteration)
        set_lr(self.optimizer, lr)
        if skips_on_device(self.optimizer):
            # The kernel itself skips a non-finite step: the CPU queues clipping and the optimizer while the
            # GPU still runs backward.
            step_unless(self.optimizer, found_inf=nonfinite.float())
        elif not bool(nonfinite):  # the offloaded optimizer steps on the host, so the host decides (and waits)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.fp8 is not None:  # after a skipped step the weights, and so their scales, are unchanged
            self.fp8.after_optimizer_step(self.model)
        if self.scaler.enabled:  # fp16's next step needs its loss scale on the host: wait for this one
            self.scaler.update(found_inf=bool(nonfinite))
        values = torch.stack([loss_total.double(), grad_norm.double(), nonfinite.double(), self._stop_flag()])
        ended = None
        if self.env.device.type == "cuda":
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
        self.state.iteration += 1
        self.state.consumed_samples += self.plan.global_batch_size
        self.state.consumed_tokens += tokens * self.plan.dp_size
        return QueuedStep(iteration=self.state.iteration, consumed_samples=self.state.consumed_samples,
                          consumed_tokens=self.state.consumed_tokens, lr=lr, tokens=tokens, values=values, ended=ended,
                          loss_scale=self.scaler.scale_value if self.scaler.enabled else None)

    def _global_count(self, local_count: int) -> torch.Tensor:
        """The global batch's loss denominator summed over data-parallel ranks, floored at 1: a 0-dim fp32
        device tensor (the dtype the loss divides in), made without a host-to-device copy, which would wait."""
        count = torch.full((), float(local_count), dtype=torch.float64, device=self.env.device)
        if dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(count, group=self.dp_group)
        return count.clamp(min=1.0).float()

    def _stop_flag(self) -> torch.Tensor:
        """1 if any rank got SIGTERM before queuing this step (each may see it at a different time), else 0:
        summed over all ranks on the device, so every rank reads the same value with the step's figures."""
        flag = torch.full((), 1.0 if self._stop_requested else 0.0, dtype=torch.float64, device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(flag)
        return flag.clamp(max=1.0)

    def _forward_backward(
        self, micro_batches: list[dict], selections: list[LabelSelection | None], *, kind: str,
        global_count: torch.Tensor,
    ) -> torch.Tensor:
        """Gradient accumulation over the rank's micro-batches; returns the sum of their losses (0-dim fp64 on
        the device: read once the step is queued)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for mb, selection in zip(micro_batches, selections, strict=True):
            mb = self._cp_slice(self._on_device(mb), kind=kind)
            numerator, _ = self._forward_loss(mb, kind=kind, selection=selection)
            loss = numerator / global_count
            # FSDP averages gradients over data-parallel (x cp) ranks; undo that to keep the global-batch sum.
            self.scaler.scale(loss * self.grad_ranks).backward()
            loss_sum += loss.detach()
        return loss_sum

    def _on_device(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A micro-batch on the training device. On CUDA it is copied from pinned memory: a copy from pageable
        memory may wait for the stream, i.e. for the step queued before, which would idle the GPU after it."""
        return {k: self._tensor_on_device(v) for k, v in mb.items()}

    def _tensor_on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.env.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.env.device, non_blocking=True)

    def _label_selection(self, mb: dict[str, torch.Tensor], *, kind: str) -> LabelSelection | None:
        """Where the fused loss runs on whole sequences (no cp slicing), the micro-batch's labelled positions
        and weights, worked out from its host copy and sent with it: selecting them on the device would make
        the host wait for the GPU in every forward, and then the loop could not stay a step ahead."""
        if self.pipeline is not None or self.cp_mesh.size() > 1 or not self._fused_loss_applies():
            return None
        host = label_selection(mb["labels"], kind=kind, document_ids=mb.get("document_ids"))
        return LabelSelection(index=self._tensor_on_device(host.index), weights=self._tensor_on_device(host.weights),
                              count=host.count)

    # ---- pipeline parallelism ------------------------------------------------------------------
    def _pipeline_forward_backward(
        self, micro_batches: list[dict], *, kind: str, global_count: torch.Tensor
    ) -> torch.Tensor:
        """The rank's micro-batches are the pipeline's: the schedule runs them through the stages and the
        last stage computes each one's loss exactly as _forward_backward does. Returns the sum of the
        losses on the last stage, 0 on the others."""
        pipe = self.pipeline
        # Each micro-batch as this rank runs it (its cp slice, with loss weights), then one batch of them
        # all; the schedule cuts it back into the same micro-batches.
        sliced = [self._cp_slice(self._on_device(mb), kind=kind) for mb in micro_batches]
        batch = with_positions({k: torch.cat([mb[k] for mb in sliced]) for k in sliced[0]})
        if self._pipeline_schedule is None:
            self._pipeline_schedule = build_schedule(
                pipe, pp_group=self.pp_group, device=self.env.device, microbatches=len(sliced),
                input_shape=tuple(sliced[0]["tokens"].shape),
                hidden_dtype=compute_dtype(self.config.training.precision), loss_fn=self._pipeline_loss,
                sequence_shards=self._sequence_shards(),
            )
        # Labels (with document ids, or a cp slice's loss weights) go to the loss on the last stage.
        fields = target_fields(batch)
        self._pipeline_loss.start(kind=kind, global_count=global_count, grad_ranks=self.grad_ranks,
                                  scaler=self.scaler, fields=fields)
        # Positions and document ids reach every stage (attention masks and RoPE).
        kwargs = {k: batch[k] for k in ("positions", "document_ids") if k in batch}
        inputs = (batch["tokens"],) if pipe.has_first else ()
        target = pack_target(batch, fields) if pipe.has_last else None
        self._pipeline_schedule.step(*inputs, target=target, **kwargs)
        sync_tied_grads(pipe, self._tied_group)
        return self._pipeline_loss.total(device=self.env.device)

    def _clip_grad_norm(self) -> torch.Tensor:
        """Clip to the whole model's gradient norm: under a pipeline summed over the stages, a tied
        embedding's second copy (the last stage's output layer) not counted twice."""
        pipe = self.pipeline
        if pipe is None:
            return clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad)
        duplicate = [pipe.tied_copy] if pipe.tied_copy is not None else []
        return clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad, pp_group=self.pp_group,
                               exclude_from_norm=duplicate)

    def _sequence_shards(self) -> int:
        """Parts of the sequence a pipeline's hidden state is cut into between stages (see build_schedule)."""
        p = self.config.parallel
        return p.tp if p.sequence_parallel else 1

    def _batch_sum(self, values: list[torch.Tensor | float]) -> torch.Tensor:
        """Sum per-rank values over the batch: the data-parallel ranks (x cp: each holds a slice of every
        row), and under a pipeline its stages (only the last stage has losses; the others contribute zeros).
        Returns them as one fp64 device tensor, without waiting for it (`.tolist()` does)."""
        total = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.env.device) for v in values])
        groups = ([self.pp_group] if self.pipeline is not None else []) + [self.loss_group]
        for group in groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(total, group=group)
        return total

    # ---- context parallelism --------------------------------------------------------------------
    def _cp_slice(self, mb: dict[str, torch.Tensor], *, kind: str) -> dict[str, torch.Tensor]:
        """This cp rank's slice of a micro-batch, with per-token loss weights (train/cp_batch.py)."""
        if self.cp_mesh.size() == 1:
            return mb
        return cp_slice(mb, kind=kind, cp_rank=self.cp_mesh.get_local_rank(), cp_size=self.cp_mesh.size())

    def _forward_loss(
        self, mb: dict[str, torch.Tensor], *, kind: str, selection: LabelSelection | None = None
    ) -> tuple[torch.Tensor, float]:
        """Forward and (numerator, count) of a micro-batch: the output layer fused with the loss where it
        applies (train/fused_loss.py: no full logits; `selection` from _label_selection), else the loss of
        the logits."""
        kwargs = {"positions": mb.get("positions"), "document_ids": mb.get("document_ids")}
        if not self._fused_loss_applies():
            return self._loss_parts(self.model(mb["tokens"], **kwargs), mb, kind=kind)
        output_fn = partial(fused_loss_parts, labels=mb["labels"], kind=kind, document_ids=mb.get("document_ids"),
                            loss_weights=mb.get("loss_weights"), selection=selection,
                            compile_backend="inductor" if self.config.training.compile else None)
        return self.model(mb["tokens"], **kwargs, output_fn=output_fn)

    def _fused_loss_applies(self) -> bool:
        t = self.config.training
        return use_fused_loss(enabled=t.fused_loss, tp=self.config.parallel.tp, precision=t.precision)

    def _loss_parts(self, logits: torch.Tensor, mb: dict[str, torch.Tensor], *, kind: str) -> tuple[torch.Tensor, float]:
        """(numerator, count) of a micro-batch, or of this cp rank's slice of one."""
        if "loss_weights" in mb:
            return slice_loss_parts(logits, mb)
        return loss_parts(logits, mb["labels"], kind=kind, document_ids=mb.get("document_ids"))

    def _probe_attention(self):
        """The SDPA backend for this job, probed with one micro-batch's attention as this rank runs it."""
        p, t = self.config.parallel, self.config.training
        model_config = resolve_model_config(self.config)
        sample = collate([self.data.train[0]])
        shape = AttentionShape(
            batch=t.micro_batch_size, heads=model_config.num_heads // p.tp, kv_heads=model_config.num_kv_heads // p.tp,
            # A cp rank attends with its slice of the sequence (never a whole-sequence mask).
            seq=sample["tokens"].shape[1] // p.cp, head_dim=model_config.dim_per_head, packed="document_ids" in sample,
        )
        backend = select_attention_backend(p.attention_backend, prefer_flash=p.flash_attention, shape=shape,
                                           device=self.env.device, dtype=compute_dtype(t.precision),
                                           compiled=t.compile and p.cp == 1)
        return agree_across_ranks(backend, device=self.env.device)

    def _loss_kind(self) -> str:
        if self.config.data.kind == "sft" and self.config.data.sft_loss == "sequence_mean":
            return "sequence"
        return "token"

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.data.valid is None:
            return {}
        self.model.eval()
        kind = self._loss_kind()
        numerator = count = 0.0
        per_round = self.plan.micro_batch_size * self.plan.dp_size
        available = len(self.data.valid) // per_round
        for round_index in range(min(self.config.training.eval_iters, available)):
            start = round_index * per_round + self.plan.dp_rank * self.plan.micro_batch_size
            mb = collate([self.data.valid[i] for i in range(start, start + self.plan.micro_batch_size)])
            mb = self._cp_slice({k: v.to(self.env.device) for k, v in mb.items()}, kind=kind)
            logits = self._forward(mb)
            if logits is None:  # a pipeline rank without the last stage
                continue
            num, cnt = self._loss_parts(logits, mb, kind=kind)
            numerator += float(num)
            count += float(cnt)
        self.model.train()
        numerator, count = self._batch_sum([numerator, count]).tolist()
        if count == 0:
            return {}
        valid_loss = numerator / count
        return {"valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50.0))}

    def _forward(self, mb: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Logits of one micro-batch without gradients; under a pipeline, on its last stage only."""
        kwargs = {"positions": mb.get("positions"), "document_ids": mb.get("document_ids")}
        if self.pipeline is None:
            return self.model(mb["tokens"], **kwargs)
        kwargs["positions"] = with_positions(mb)["positions"]
        return forward_only(self.pipeline, pp_group=self.pp_group, tokens=mb["tokens"],
                            hidden_dtype=compute_dtype(self.config.training.precision),
                            sequence_shards=self._sequence_shards(), **kwargs)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> None:
        config, info = self.config, self.schedule_info
        self.run.prepare(config)
        self.resume_or_init()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        writer = None
        if self.env.rank == 0:
            writer = MetricsWriter(
                self.run.root, tensorboard_dir=self.run.tensorboard_dir(config),
                wandb_project=config.logging.wandb_project, run_name=config.logging.run_name,
                config=to_dict(config),
            )
        throughput = Throughput(
            world_size=self.env.world_size,
            flops_per_token=flops_per_token(self.model_config, seq_len=config.training.seq_len),
            peak_tflops=device_peak_tflops(self.env.device),
        )
        self.run.log(
            f"training {info.train_iters} iterations (warmup {info.warmup_iters}, decay {info.decay_iters}), "
            f"global batch {self.plan.global_batch_size}, micro batch {self.plan.micro_batch_size}, "
            f"dp {self.plan.dp_size}, grad accumulation {self.plan.grad_accum_steps}"
        )
        if self.config.parallel.cp > 1:  # ring attention calls its block kernels itself, not through SDPA
            self.run.log(f"attention: ring attention over parallel.cp={self.config.parallel.cp} ranks")
        else:
            self.run.log(self.attention.describe())
        if self.fp8 is not None:
            self.run.log(self.fp8.describe())
        self.model.train()
        profiler = StepProfiler(config.logging.profile_iterations, out_dir=self.run.root / "profile",
                                rank=self.env.rank, device=self.env.device)
        log = _LoopLog(writer=writer, throughput=throughput, started=time.perf_counter(),
                       start_iteration=self.state.iteration)
        pending: QueuedStep | None = None  # the step before the one just queued, its figures not yet read
        while self.state.iteration < info.train_iters:
            profiler.start(self.state.iteration + 1)
            step = self.train_step()
            # The previous step's figures are read while this one runs: the host waits for the device at a
            # step boundary only where it acts on the state after the step (below).
            stop = pending is not None and self._finish(pending, log=log, profiler=profiler)
            pending = step
            it = step.iteration
            exit_now = bool(config.training.exit_interval) and it % config.training.exit_interval == 0
            save = it % config.checkpoint.save_interval == 0 or (it == info.train_iters and config.checkpoint.save_at_end)
            host_acts = stop or exit_now or save or it == info.train_iters or self._evaluates_at(it) or profiler.ends_at(it)
            if self._runs_ahead() and not host_acts:
                continue
            # Evaluation, a checkpoint, a profile or the end see the state after this step: nothing else is queued.
            stop = self._finish(step, log=log, profiler=profiler) or stop
            pending = None
            if save or stop or exit_now:
                self.save()
            if stop or exit_now:
                reason = "SIGTERM" if stop else f"training.exit_interval={config.training.exit_interval}"
                self.run.log(f"stopping at iteration {it} ({reason}); run the same command to continue")
                break
        self.saver.wait()
        if writer is not None:
            writer.close()

    def _runs_ahead(self) -> bool:
        """Whether the loop queues the next step before reading this one: on an asynchronous device. On the
        CPU a step is computed when it is queued, so reading it a step late would only log each step's time
        against the next one."""
        return self.env.device.type == "cuda"

    def _finish(self, step: QueuedStep, *, log: _LoopLog, profiler: StepProfiler) -> bool:
        """Read a queued step's figures (waiting for it), count a skip, log; returns whether any rank asked to stop."""
        result = step.resolve()
        if result.skipped:
            self.state.skipped_steps += 1
            self.run.log(f"iteration {step.iteration}: non-finite loss or gradient, step skipped")
            if not self.scaler.enabled and self.state.skipped_steps > self.config.training.max_skipped_steps:
                raise LlamatronError(
                    f"{self.state.skipped_steps} steps skipped for non-finite values (limit "
                    f"training.max_skipped_steps={self.config.training.max_skipped_steps}); lower optim.lr or check the data"
                )
        table = profiler.stop(step.iteration)
        if table is not None:
            self.run.log(f"profile of iterations {self.config.logging.profile_iterations}: {table}")
        log.throughput.add_tokens(result.tokens * self.plan.dp_size)
        if step.iteration % self.config.logging.log_interval == 0 or step.iteration == self.schedule_info.train_iters:
            record = self._log_record(step, result, log)
            if self._evaluates_at(step.iteration):  # fit read this step before queuing another (see there)
                record.update(self.evaluate())
            self.run.log_step(record, total=self.schedule_info.train_iters)
            if log.writer is not None:
                log.writer.write(record)
        return result.stop_requested

    def _evaluates_at(self, iteration: int) -> bool:
        """Validation runs at logged iterations that are multiples of training.eval_interval."""
        interval = self.config.training.eval_interval
        logged = iteration % self.config.logging.log_interval == 0 or iteration == self.schedule_info.train_iters
        return bool(interval) and iteration % interval == 0 and logged

    def _log_record(self, step: QueuedStep, result: StepResult, log: _LoopLog) -> dict:
        it = step.iteration
        rates = log.throughput.report(ended=step.ended)
        elapsed = time.perf_counter() - log.started
        eta = elapsed / max(it - log.start_iteration, 1) * (self.schedule_info.train_iters - it)
        return {
            "iteration": it, "loss": result.loss, "lr": step.lr, "grad_norm": result.grad_norm,
            "consumed_samples": step.consumed_samples, "consumed_tokens": step.consumed_tokens, **rates,
            "peak_memory_gib": peak_memory_gib(self.env.device), "alloc_retries": allocator_retries(self.env.device),
            "skipped_steps": self.state.skipped_steps,
            "loss_scale": step.loss_scale, "eta_s": eta,
        }

    def save(self) -> None:
        path = self.saver.save(model=self.model, optimizer=self.optimizer, state=self.state)
        self.run.log(f"saved {path}" + (" (writing in the background)" if self.config.checkpoint.async_save else ""))

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._stop_requested = True


def layout_problems(config: JobConfig, *, world_size: int) -> list[str]:
    """What only the process count reveals: the parallel degrees and the batch split."""
    p, t = config.parallel, config.training
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp)
    found = dims.problems()
    if not found:
        plan = BatchPlan(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                         dp_rank=0, dp_size=dims.dp)
        found += plan.problems()
    if p.tp > 1:
        found += tp_problems(resolve_model_config(config), p.tp)
        if p.sequence_parallel:
            lengths = {"training.seq_len": t.seq_len, **({"data.pad_len": config.data.pad_len}
                                                         if config.data.pad_len else {})}
            found += sequence_problems(lengths, p.tp)
    if p.pp > 1 or p.virtual_pipeline != 1 or p.pp_layers is not None:
        found += pipeline_problems(config, num_layers=resolve_model_config(config).num_layers, dp=dims.dp,
                                   batch_ok=not found)
    if p.cp > 1:
        lengths = {"training.seq_len": t.seq_len, **({"data.pad_len": config.data.pad_len} if config.data.pad_len else {})}
        found += cp_problems(lengths, cp=p.cp, tp=p.tp, sequence_parallel=p.tp > 1 and p.sequence_parallel)
    return found


def unsupported_features(config: JobConfig) -> list[str]:
    """Settings that are valid but not built yet: refused with a clear message, never ignored."""
    del config  # every setting is built at present
    return []


def check_supported(config: JobConfig) -> None:
    found = unsupported_features(config)
    if found:
        raise LlamatronError(
            f"not yet supported: {', '.join(found)}"
        )


def train(config: JobConfig) -> None:
    """Entry point on every rank."""
    config.validate()
    check_supported(config)
    env = init_distributed(config.training.device)
    threads = host_threads_for(env.device)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(config.training.seed)
        trainer = Trainer(config, env)
        trainer.fit()
        if env.rank == 0:
            summary = {"iteration": trainer.state.iteration, "output": str(trainer.run.root)}
            trainer.run.log("done: " + json.dumps(summary))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: Llama) -> Llama:
    return model
