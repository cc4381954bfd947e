#!/bin/bash
# SKPO on Qwen2.5-Math-7B (configs/skpo.yaml) under Slurm. Submit from the repository root:
#   sbatch scripts/run_7b.sh [--tp 2] [--pp 1] [--run-dir runs/qwen7b] [key=value ...]
#   bash scripts/run_7b.sh --dry-run --nodes 2 --gpus-per-node 8    # print the per-node torchrun commands
# Pre-emption or the time limit requeues the job (--requeue; USR1 300 s before the limit), and the
# requeued job resumes from <run-dir>/checkpoints/latest. Options: scripts/lib/launch.sh --help.
#SBATCH --job-name=skpo-qwen2.5-math-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: find the repository from the submit dir.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${SKPO_ROOT:-} ]]; then
  if [[ -f $here/lib/launch.sh ]]; then SKPO_ROOT=$(dirname "$here"); else SKPO_ROOT=${SLURM_SUBMIT_DIR:-$PWD}; fi
fi
[[ -f $SKPO_ROOT/scripts/lib/launch.sh ]] || { echo "run_7b.sh: $SKPO_ROOT is not the megatron-skpo repository (set SKPO_ROOT)" >&2; exit 2; }
cd "$SKPO_ROOT"
source scripts/models/qwen2.5-math-7b.sh
source scripts/lib/launch.sh
skpo_launch "$@"
