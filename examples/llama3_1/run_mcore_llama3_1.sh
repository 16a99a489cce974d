#!/usr/bin/env bash
# The seed's launcher (Pai-Megatron-Patch examples/llama3_1/run_mcore_llama3_1.sh), as a thin adapter:
# its 25 positional arguments and MP_* variables become one `llamatron train` command.
#
#   ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP SP DO FL SFT AC
#   OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH
#   TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH
#
# ENV=dsw: one node, every local GPU (GPUS_PER_NODE overrides; 1 CPU process where there is no GPU).
# ENV=dlc: several nodes from WORLD_SIZE (nodes), RANK (node rank), MASTER_ADDR, MASTER_PORT and
# KUBERNETES_CONTAINER_RESOURCE_GPU (GPUs per node), as a PAI-DLC / PyTorchJob sets them.
# MODEL_SIZE: 8B, 70B (the seed's), and also 1B, 3B, 405B, tiny (the tiny-debug model for CPUs).
# Env: MP_AC_LAYERS (default 1), MP_DATASET_TYPE idxmap|raw (SFT, default idxmap), MP_SFT_PACKING
# true|false, MP_VP (virtual pipeline stages). LLAMATRON overrides the llamatron command.
# The seed runs it as `sh run_mcore_llama3_1.sh ...`; where sh is not bash (dash on Debian/Ubuntu),
# hand over to bash before the first bash-only line.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

if [ "$#" -lt 25 ]; then
  echo "usage: $0 ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH (got $# arguments)" >&2
  exit 2
fi

ENV=$1; MODEL_SIZE=$2; BATCH_SIZE=$3; GLOBAL_BATCH_SIZE=$4; LR=$5; MIN_LR=$6; SEQ_LEN=$7; PAD_LEN=$8
PR=$9; TP=${10}; PP=${11}; CP=${12}; SP=${13}; DO=${14}; FL=${15}; SFT=${16}; AC=${17}
OPTIMIZER_OFFLOAD=${18}; SAVE_INTERVAL=${19}; DATASET_PATH=${20}; VALID_DATASET_PATH=${21}
PRETRAIN_CHECKPOINT_PATH=${22}; TRAIN_TOKENS_OR_ITERS=${23}; WARMUP_TOKENS_OR_ITERS=${24}; OUTPUT_BASEPATH=${25}

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [ -n "${LLAMATRON:-}" ]; then
  read -r -a CMD <<<"$LLAMATRON"
elif [ -x "$REPO/.venv/bin/llamatron" ]; then
  CMD=("$REPO/.venv/bin/llamatron")
else
  CMD=(llamatron)
fi

case "$ENV" in
  dsw)
    if [ -z "${GPUS_PER_NODE:-}" ]; then
      GPUS_PER_NODE=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
      [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=1
    fi
    LAUNCH=(--nproc-per-node "$GPUS_PER_NODE")
    ;;
  dlc)
    : "${WORLD_SIZE:?dlc needs WORLD_SIZE (nodes)}" "${RANK:?dlc needs RANK (node rank)}"
    : "${MASTER_ADDR:?dlc needs MASTER_ADDR}" "${MASTER_PORT:?dlc needs MASTER_PORT}"
    GPUS_PER_NODE=${KUBERNETES_CONTAINER_RESOURCE_GPU:-${GPUS_PER_NODE:-8}}
    NODES=$WORLD_SIZE; NODE_RANK=$RANK
    # These name nodes here; the workers' own RANK/WORLD_SIZE come from torchrun.
    unset WORLD_SIZE RANK
    LAUNCH=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NODES" --node-rank "$NODE_RANK"
            --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    ;;
  *) echo "ENV must be dsw or dlc, got '$ENV'" >&2; exit 2 ;;
esac

case "$MODEL_SIZE" in
  8B|70B|405B|1B|3B|tiny|tiny-debug) ;;
  *) echo "MODEL_SIZE must be 8B, 70B, 405B, 1B, 3B or tiny, got '$MODEL_SIZE'" >&2; exit 2 ;;
esac

bool() { case "$1" in true|false) echo "$1" ;; *) echo "$2 must be true or false, got '$1'" >&2; exit 2 ;; esac; }
SP=$(bool "$SP" SP); DO=$(bool "$DO" DO); FL=$(bool "$FL" FL); SFT=$(bool "$SFT" SFT)
[ "$AC" = false ] && AC_MODE=none || AC_MODE=$AC
[ "$OPTIMIZER_OFFLOAD" = false ] && OFFLOAD=none || OFFLOAD=$OPTIMIZER_OFFLOAD

ARGS=(
  --training.micro_batch_size="$BATCH_SIZE" --training.global_batch_size="$GLOBAL_BATCH_SIZE"
  --optim.lr="$LR" --optim.min_lr="$MIN_LR" --training.seq_len="$SEQ_LEN" --data.pad_len="$PAD_LEN"
  --training.precision="$PR" --tp "$TP" --pp "$PP" --cp "$CP"
  --parallel.sequence_parallel="$SP" --parallel.distributed_optimizer="$DO" --parallel.flash_attention="$FL"
  --parallel.activation_checkpoint="$AC_MODE" --parallel.ac_layers="${MP_AC_LAYERS:-1}"
  --parallel.optimizer_offload="$OFFLOAD" --parallel.virtual_pipeline="${MP_VP:-1}"
  --save-interval "$SAVE_INTERVAL" --model.name="$MODEL_SIZE"
)
if [ "$PRETRAIN_CHECKPOINT_PATH" != "none" ] && [ -n "$PRETRAIN_CHECKPOINT_PATH" ]; then
  # The seed's --load of a converted checkpoint: weights only, counters from zero.
  ARGS+=(--model.init_from="$PRETRAIN_CHECKPOINT_PATH" --model.finetune=true)
fi

if [ "$SFT" = true ]; then
  TRAIN_ITERS=$TRAIN_TOKENS_OR_ITERS; WARMUP_ITERS=$WARMUP_TOKENS_OR_ITERS
  PREFIX="finetune-mcore-llama3-1-${MODEL_SIZE}-lr-${LR}-minlr-${MIN_LR}-bs-${BATCH_SIZE}-gbs-${GLOBAL_BATCH_SIZE}-seqlen-${SEQ_LEN}"
  ARGS+=(--data.kind=sft --data.sft_format="${MP_DATASET_TYPE:-idxmap}" --data.packing="${MP_SFT_PACKING:-false}"
         --data.data_path="$DATASET_PATH" --data.valid_data_path="$VALID_DATASET_PATH"
         --train-iters "$TRAIN_ITERS" --training.warmup_iters="$WARMUP_ITERS")
else
  TRAIN_ITERS=$(( TRAIN_TOKENS_OR_ITERS / GLOBAL_BATCH_SIZE / SEQ_LEN ))
  WARMUP_ITERS=$(( WARMUP_TOKENS_OR_ITERS / GLOBAL_BATCH_SIZE / SEQ_LEN ))
  PREFIX="pretrain-mcore-llama3-1-${MODEL_SIZE}-lr-${LR}-minlr-${MIN_LR}-bs-${BATCH_SIZE}-gbs-${GLOBAL_BATCH_SIZE}-seqlen-${SEQ_LEN}"
  ARGS+=(--data.kind=pretrain --data.data_path="$DATASET_PATH" --data.split=99,1,0
         --training.train_tokens="$TRAIN_TOKENS_OR_ITERS" --training.warmup_tokens="$WARMUP_TOKENS_OR_ITERS")
fi
NAME="${PREFIX}-pr-${PR}-tp-${TP}-pp-${PP}-cp-${CP}-ac-${AC}-do-${DO}-sp-${SP}-ti-${TRAIN_ITERS}-wi-${WARMUP_ITERS}"

# The seed's layout: {OUT}/checkpoint/{NAME} and {OUT}/tensorboard/{NAME}_{time}.
ARGS+=(--output "$OUTPUT_BASEPATH/checkpoint/$NAME" --logging.run_name="$NAME"
       --logging.tensorboard_dir="$OUTPUT_BASEPATH/tensorboard")
if [ "$MODEL_SIZE" = tiny ] || [ "$MODEL_SIZE" = tiny-debug ]; then
  ARGS+=(--training.device=auto)
fi

exec "${CMD[@]}" train "${LAUNCH[@]}" "${ARGS[@]}"
