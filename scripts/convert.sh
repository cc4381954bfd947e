#!/bin/bash
# HF <-> Megatron checkpoints through skpo-convert, with a model file's defaults.
#   scripts/convert.sh [--model-file NAME] [--dry-run] hf-to-mcore|mcore-to-hf|verify [skpo-convert options]
# With --model-file (scripts/models/NAME.sh), hf-to-mcore defaults to --hf $MODEL_HF_PATH
# --tp $MODEL_TP --pp $MODEL_PP (and --ep $MODEL_EP for MoE models) --out checkpoints/NAME-mcore-tpTppP[epE];
# options given win. Examples:
#   scripts/convert.sh --model-file qwen2.5-math-7b hf-to-mcore
#   scripts/convert.sh mcore-to-hf --mcore runs/qwen2.5-math-7b/checkpoints/step_00000500/model --out hf_out \
#       --like checkpoints/Qwen2.5-Math-7B
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/launch.sh"

skpo_wrapper_args "$@"
((${#args[@]})) || skpo_die "usage: scripts/convert.sh [--model-file NAME] [--dry-run] hf-to-mcore|mcore-to-hf|verify [options]"

# value of option $1 among the arguments ("--tp 4" or "--tp=4"), else $2
value() {
  local i
  for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[i]} == "$1="* ]] && { echo "${args[i]#*=}"; return; }
    [[ ${args[i]} == "$1" ]] && ((i + 1 < ${#args[@]})) && { echo "${args[i + 1]}"; return; }
  done
  echo "$2"
}
if [[ -n $model_file ]]; then
  skpo_model_file "$model_file"
  if [[ ${args[0]} == hf-to-mcore ]]; then
    skpo_has_arg --hf || args+=(--hf "$MODEL_HF_PATH")
    tp=$(value --tp "$MODEL_TP") pp=$(value --pp "$MODEL_PP") ep=$(value --ep "${MODEL_EP:-1}")
    skpo_has_arg --tp || args+=(--tp "$tp")
    skpo_has_arg --pp || args+=(--pp "$pp")
    [[ $ep == 1 ]] || skpo_has_arg --ep || args+=(--ep "$ep")
    suffix=""; [[ $ep == 1 ]] || suffix="ep$ep"
    skpo_has_arg --out || args+=(--out "checkpoints/$MODEL_NAME-mcore-tp${tp}pp${pp}$suffix")
  elif [[ ${args[0]} == verify ]]; then
    skpo_has_arg --hf || args+=(--hf "$MODEL_HF_PATH")
  fi
fi
skpo_tool skpo-convert checkpoint_convert.cli
skpo_run "${SKPO_TOOL[@]}" "${args[@]}"
