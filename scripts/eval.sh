#!/bin/bash
# Benchmarks (avg@k / pass@k) through skpo-eval, with a model file's defaults.
#   scripts/eval.sh [--model-file NAME] [--dry-run] [skpo-eval options]
# With --model-file (scripts/models/NAME.sh): --model defaults to $MODEL_HF_PATH, --out to
# runs/eval/NAME, and the file's EVAL_ARGS (prompt template, token caps, k) come first so that
# options given win. Examples:
#   scripts/eval.sh --model-file qwen2.5-math-7b --benchmarks math500,gsm8k
#   scripts/eval.sh --model-file qwen2.5-math-7b --model hf_out --out runs/eval/qwen7b-skpo
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/launch.sh"

skpo_wrapper_args "$@"

defaults=()
if [[ -n $model_file ]]; then
  skpo_model_file "$model_file"
  defaults=(${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"})
  skpo_has_arg --model || defaults+=(--model "$MODEL_HF_PATH")
  skpo_has_arg --out || defaults+=(--out "runs/eval/$MODEL_NAME")
fi
skpo_has_arg --model || [[ ${defaults[*]-} == *--model* ]] || skpo_die "--model DIR (or --model-file NAME) is required"
skpo_tool skpo-eval megatron_skpo.cli.eval
skpo_run "${SKPO_TOOL[@]}" ${defaults[@]+"${defaults[@]}"} ${args[@]+"${args[@]}"}
