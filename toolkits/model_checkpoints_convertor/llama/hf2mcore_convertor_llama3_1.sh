#!/bin/bash
# Seed-compatible converter (Pai-Megatron-Patch's hf2mcore_convertor_llama3_1.sh arguments), a thin
# adapter over `llamatron convert` / `llamatron check`:
#
#   MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]
#
#   mg2hf=false: HF (SOURCE) -> Megatron-Core TP x PP (TARGET)   llamatron convert hf-to-mcore
#   mg2hf=true:  Megatron-Core (SOURCE) -> HF (TARGET); HF_CKPT_PATH (required) gives the tokenizer
#                files and, with CHECK, the reference model       llamatron convert mcore-to-hf
#   CHECK=true:  compare the two models layer by layer afterwards (exit 1 on a mismatch)
#   CHECK_ONLY=true: only compare, convert nothing                  llamatron check
#   PR: fp16 | bf16 | fp32, the dtype written (and checked in)
# MODEL_SIZE (8B, 70B, ...) is accepted for compatibility; the shapes come from the checkpoint itself.
# Set LLAMATRON to choose the command (default: `llamatron`, else `python -m llamatron.cli.main`).
set -euo pipefail

if [ "$#" -lt 9 ]; then
    echo "usage: $0 MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]" >&2
    exit 2
fi
MODEL_SIZE=$1
SOURCE_CKPT_PATH=$2
TARGET_CKPT_PATH=$3
TP=$4
PP=$5
MG2HF=$6
CHECK=$7
CHECK_ONLY=$8
PR=$9
HF_CKPT_PATH=${10:-}

if [ -n "${LLAMATRON:-}" ]; then
    read -r -a RUN <<< "${LLAMATRON}"
elif command -v llamatron > /dev/null 2>&1; then
    RUN=(llamatron)
else
    RUN=(python -m llamatron.cli.main)
fi

is_true() {
    case "$1" in
        true|True|TRUE|1|yes) return 0 ;;
        false|False|FALSE|0|no) return 1 ;;
        *) echo "hf2mcore_convertor_llama3_1.sh: expected true or false, got '$1'" >&2; exit 2 ;;
    esac
}

echo "llamatron: MODEL_SIZE=${MODEL_SIZE} TP=${TP} PP=${PP} mg2hf=${MG2HF} CHECK=${CHECK} CHECK_ONLY=${CHECK_ONLY} PR=${PR}" >&2

if is_true "${MG2HF}"; then
    if [ -z "${HF_CKPT_PATH}" ]; then
        echo "hf2mcore_convertor_llama3_1.sh: mg2hf=true needs HF_CKPT_PATH (10th argument)" >&2
        exit 2
    fi
    if is_true "${CHECK_ONLY}"; then
        exec "${RUN[@]}" check --hf "${HF_CKPT_PATH}" --mcore "${SOURCE_CKPT_PATH}" --dtype "${PR}" --device auto
    fi
    EXTRA=()
    if is_true "${CHECK}"; then
        EXTRA=(--check --hf-reference "${HF_CKPT_PATH}" --device auto)
    fi
    exec "${RUN[@]}" convert mcore-to-hf --mcore "${SOURCE_CKPT_PATH}" --out "${TARGET_CKPT_PATH}" \
        --dtype "${PR}" --tokenizer "${HF_CKPT_PATH}" "${EXTRA[@]}"
fi

if is_true "${CHECK_ONLY}"; then
    exec "${RUN[@]}" check --hf "${SOURCE_CKPT_PATH}" --mcore "${TARGET_CKPT_PATH}" --dtype "${PR}" --device auto
fi
EXTRA=()
if is_true "${CHECK}"; then
    EXTRA=(--check --device auto)
fi
exec "${RUN[@]}" convert hf-to-mcore --hf "${SOURCE_CKPT_PATH}" --out "${TARGET_CKPT_PATH}" \
    --tp "${TP}" --pp "${PP}" --dtype "${PR}" "${EXTRA[@]}"
