"""The training job's configuration: one typed dataclass per section, validated on construction.

A recipe (YAML) fills these; `--section.field=value` overrides change single fields; the resolved
config is written into the run directory as `config.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llamatron.errors import LlamatronError


@dataclass(kw_only=True)
class ModelSection:
    name: str | None = None
    """A preset (llama3.1-8b, llama3.1-70b, llama3.2-1b, llama3.2-3b, tiny, or the seed's 8B/70B) or a HF directory.
    None: the architecture of init_from's weights, or `tiny` without init_from."""
    init_from: str | None = None
    """Initial weights: a HF directory, a Megatron-Core checkpoint (any TP x PP) or a llamatron run or checkpoint.
    None starts from a deterministic random init."""
    finetune: bool = False
    """With init_from a llamatron checkpoint: load only the weights and start counters, optimizer and data at zero."""
    tokenizer: str = "llama3"
    """llama3, or a HF tokenizer directory."""


@dataclass(kw_only=True)
class DataSection:
    kind: Literal["pretrain", "sft"] = "pretrain"
    """Continued pretraining on indexed data, or supervised fine-tuning."""
    data_path: list[str] = field(default_factory=list)
    """Pretraining: Megatron-style `[prefix]` or `[w1, prefix1, w2, prefix2, ...]`. SFT: a JSON/JSONL file (raw) or an
    idxmap prefix."""
    split: str = "99,1,0"
    """Train/valid/test split of data_path by documents (Megatron's split string)."""
    valid_data_path: list[str] = field(default_factory=list)
    """A separate validation set; when empty the split's valid part is used."""
    sft_format: Literal["raw", "idxmap"] = "raw"
    """SFT data: raw JSON/JSONL records, or a preprocessed SFT idxmap (the seed's MP_DATASET_TYPE)."""
    packing: bool = False
    """SFT: pack several samples into one sequence, attention isolated between them (MP_SFT_PACKING)."""
    pad_len: int | None = None
    """SFT raw mode: pad/truncate each sample to this many tokens (the seed's PAD_LEN); None means seq_len."""
    sft_loss: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    """The seed's SFT loss averages each sequence's mean token loss; token_mean averages all tokens."""
    sft_record_format: Literal["auto", "alpaca", "query", "messages", "sharegpt"] = "auto"
    """SFT raw records: detected from their fields, or named."""
    train_on_prompt: bool = False
    """SFT: train on prompt tokens too (default: only assistant turns, header and <|eot_id|> included)."""
    train_turns: Literal["all", "last"] = "all"
    """SFT multi-turn records: train every assistant turn, or only the last."""
    default_system: bool = False
    """SFT: insert the seed's Llama 3.1 system block where a record has none."""
    truncate: bool = False
    """SFT: cut samples longer than the row (default: drop them, counted in the summary)."""
    on_error: Literal["fail", "skip"] = "fail"
    """SFT raw records: stop at the first bad record, or skip and count bad ones."""


@dataclass(kw_only=True)
class TrainingSection:
    micro_batch_size: int = 1
    """Samples per data-parallel rank per forward/backward (the seed's BATCH_SIZE)."""
    global_batch_size: int = 8
    """Samples per optimizer step across all ranks; the rest is gradient accumulation."""
    seq_len: int = 128
    train_iters: int | None = None
    """Optimizer steps. Give this or train_tokens (pretraining: iters = tokens // (global_batch * seq_len))."""
    train_tokens: int | None = None
    warmup_iters: int | None = None
    warmup_tokens: int | None = None
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"
    """bf16/fp16 compute with fp32 master weights and fp32 gradient reduction; fp32 for tests. fp8: the
    blocks' linears multiply in fp8 (torchao float8, Ada/Hopper GPUs), everything else in bf16."""
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """fp8 scaling: one scale per tensor (fastest; FSDP all-gathers weights in fp8), or one per row (closer
    to bf16, slower; weights all-gathered in bf16)."""
    fp8_emulate: bool = False
    """fp8 casts with ordinary matmuls, on any device: checks fp8 numerics on CPUs, never faster."""
    seed: int = 1234
    eval_interval: int = 0
    """Validate every this many iterations (0: never)."""
    eval_iters: int = 10
    """Validation micro-batches per rank per evaluation."""
    exit_interval: int | None = None
    """Stop (after saving) once the iteration count reaches a multiple of this; the schedule still runs to
    train_iters, so rerunning the command continues exactly (Megatron's --exit-interval)."""
    max_skipped_steps: int = 10
    """Abort after this many steps skipped for a non-finite loss or gradient norm."""
    device: str = "auto"
    """cpu, cuda or auto."""
    fused_loss: bool = True
    """Output layer and cross entropy fused, in chunks of tokens (train/fused_loss.py): the logits, and their
    fp32 copy for the loss, never exist for the whole micro-batch (8B, 8192 tokens: ~10 GiB less). Same
    loss and gradients as the plain path (fp32: within 1e-6). Used where it applies: tensor parallelism
    keeps its vocabulary-parallel loss (which never gathers the logits either), and fp16 keeps the plain
    loss (gradients computed before the loss scale would underflow in fp16)."""
    compile: bool = False
    """torch.compile each transformer block (parallel/compile.py; after TP and activation checkpointing,
    before FSDP, as torchtitan). The first steps are slower while the blocks compile."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """With compile: inductor's mode. max-autotune-no-cudagraphs benchmarks Triton matmul templates against
    cuBLAS for every matmul shape and may fuse the element-wise work after a matmul into it (SwiGLU's
    multiply, the residual adds); compiling takes minutes instead of seconds. Modes with CUDA graphs are not
    offered: FSDP's hooks run between the compiled blocks."""


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.1
    """Applied to matrices and embeddings only; never to norms or biases."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_iters: int | None = None
    """Megatron's lr-decay-iters; None means train_iters (pretraining) or train - warmup (SFT, as the seed)."""


@dataclass(kw_only=True)
class ParallelSection:
    tp: int = 1
    """Tensor parallel degree."""
    pp: int = 1
    """Pipeline parallel degree."""
    cp: int = 1
    """Context parallel degree."""
    virtual_pipeline: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B; the seed's MP_VP)."""
    pp_layers: list[int] | None = None
    """Layers per pipeline stage, one count per virtual stage in model order (pp * virtual_pipeline counts
    summing to the model's layers), e.g. `--parallel.pp_layers=15,17` for pp=2 (as `convert --pp-layers`);
    None splits evenly. Megatron's first/last-stage layer options are the special case of uneven ends."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    """Shard optimizer state and gradients across data-parallel ranks (FSDP2); False replicates them."""
    reshard_after_forward: bool = True
    """Free each block's gathered compute-dtype parameters after its forward and gather them again for its
    backward (FSDP2's default). False gathers (and casts) once per step, holding a compute-dtype copy of
    all blocks for the whole step: faster where memory allows, the more so with one rank, where the
    gather is only a cast."""
    grad_reduce_in_bf16: bool = False
    """Sum gradients over the data-parallel (x cp) ranks in bf16 rather than fp32 (Megatron's
    --grad-reduce-in-bf16): half the reduce-scatter (or all-reduce) traffic, for a sum rounded to bf16 at each
    rank it passes. The fp32 gradients the optimizer reads are cast from the result. With one data-parallel
    rank nothing is summed and the gradients are identical. Needs training.precision bf16 or fp8."""
    flash_attention: bool = True
    """The seed's FL, for attention_backend=auto: true tries flash attention first (PyTorch's own order);
    false leaves flash out and tries cuDNN first (Megatron's fused attention)."""
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """The SDPA kernel: auto lets PyTorch pick (see flash_attention); a named one is the only one enabled,
    and a start-up probe refuses it, naming those that work, where it cannot run the job's attention.
    The log names the kernel that ran."""
    activation_checkpoint: Literal["none", "sel", "full", "offload"] = "none"
    ac_layers: int = 1
    """Blocks per stage checkpointed or offloaded with full/offload (the seed's MP_AC_LAYERS)."""
    optimizer_offload: Literal["none", "static", "auto"] = "none"


@dataclass(kw_only=True)
class CheckpointSection:
    save_interval: int = 1000
    """Save every this many iterations (and at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (0: keep all)."""
    save_at_end: bool = True
    """Also save after the last iteration (benchmarks turn this off)."""
    async_save: bool = False
    """Write checkpoints in the background after staging them to CPU memory; a checkpoint becomes
    `latest` once all ranks finished writing it."""


@dataclass(kw_only=True)
class LoggingSection:
    log_interval: int = 1
    run_name: str | None = None
    """Name of the TensorBoard run ({output}/tensorboard/{run_name}_{time}); the seed's launcher sets its NAME."""
    tensorboard: bool = True
    tensorboard_dir: str | None = None
    """Where TensorBoard runs go; None means {output}/tensorboard."""
    wandb_project: str | None = None
    profile_iterations: list[int] | None = None
    """FIRST,LAST: run torch.profiler over these iterations (1-based, as logged), e.g. 6,8, and write
    {output}/profile/trace_rank{r}.json and kernels_rank{r}.txt (kernels ranked by device time)."""


@dataclass(kw_only=True)
class JobConfig:
    output: str = "runs/default"
    """The run directory: checkpoints, metrics.jsonl, config.yaml, tensorboard/."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def problems(self) -> list[str]:
        """Every inconsistency that does not need the world size or the model (those are checked at launch)."""
        t, o, d = self.training, self.optim, self.data
        found = []
        if t.micro_batch_size < 1:
            found.append(f"training.micro_batch_size must be >= 1, got {t.micro_batch_size}")
        if t.global_batch_size % max(t.micro_batch_size, 1):
            found.append(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"training.micro_batch_size ({t.micro_batch_size})"
            )
        if t.seq_len < 2:
            found.append(f"training.seq_len must be >= 2, got {t.seq_len}")
        if (t.train_iters is None) == (t.train_tokens is None):
            found.append("give exactly one of training.train_iters and training.train_tokens")
        if t.warmup_iters is not None and t.warmup_tokens is not None:
            found.append("give at most one of training.warmup_iters and training.warmup_tokens")
        if o.min_lr > o.lr:
            found.append(f"optim.min_lr ({o.min_lr}) is above optim.lr ({o.lr})")
        if not d.data_path:
            found.append("data.data_path is empty; pass --data.data_path=PATH (or set it in the recipe)")
        if t.compile_mode != "default" and not t.compile:
            found.append(f"training.compile_mode={t.compile_mode} applies with training.compile=true; set it or drop the mode")
        if t.fp8_emulate and t.precision != "fp8":
            found.append(f"training.fp8_emulate=true applies to training.precision=fp8, not {t.precision}")
        p = self.parallel
        if not p.flash_attention and p.attention_backend == "flash":
            found.append("parallel.flash_attention=false contradicts parallel.attention_backend=flash; drop one")
        if p.grad_reduce_in_bf16 and t.precision not in ("bf16", "fp8"):
            found.append(f"parallel.grad_reduce_in_bf16=true needs training.precision bf16 or fp8 (their gradients are "
                         f"bf16), not {t.precision}; drop the option or change the precision")
        if p.cp > 1 and p.attention_backend != "auto":
            found.append(f"parallel.attention_backend={p.attention_backend} does not apply with parallel.cp={p.cp} "
                         "(ring attention picks its block kernels); use auto")
        if self.checkpoint.save_interval < 1:
            found.append(f"checkpoint.save_interval must be >= 1, got {self.checkpoint.save_interval}")
        window = self.logging.profile_iterations
        if window is not None and (len(window) != 2 or not 1 <= window[0] <= window[1]):
            found.append(f"logging.profile_iterations must be FIRST,LAST with 1 <= FIRST <= LAST, got {window}")
        return found

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise LlamatronError(
                f"infeasible configuration, {len(found)} problem(s): " + "; ".join(found)
            )
