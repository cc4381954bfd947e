#!/usr/bin/env bash
# Code RL on CPU: GRPO trains SmolLM2-135M-Instruct on a small local set of one-line stdin/stdout
# programs (scripts/make_code_problems.py: 24 train, 8 held out), the code reward running each
# response's last ```python block against the problem's tests in the bubblewrap sandbox.
# Validation (avg@4 and pass@4 on the 8 held-out problems) runs before the first step, every 3
# steps and after the last. Environment: CODE_STEPS (default 6).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
py=.venv/bin/python
model=.cache/smollm2-135m-instruct
out=runs/code_cpu
if [ ! -f "$model/config.json" ]; then
  "$py" -W ignore -c "
from checkpoint_convert.gguf import find_smollm2_gguf, gguf_to_hf
print('converted to', gguf_to_hf(find_smollm2_gguf(), '$model', 'bfloat16'))"
fi
"$py" scripts/make_code_problems.py "$out/problems.jsonl"
rm -rf "$out/train"
.venv/bin/skpo-train configs/code_cpu.yaml model.hf_path="$model" logging.dir="$out/train" \
  train.steps="${CODE_STEPS:-6}" logging.progress=false logging.lines=true checkpoint.enabled=false
"$py" -m megatron_skpo.trainer.summary "$out/train"
