#!/usr/bin/env bash
# Common logic of the Slurm launch scripts (scripts/run_*.sh).
#
# Sourced by a run script after a model file (scripts/models/*.sh) has set MODEL_NAME, MODEL_RECIPE,
# MODEL_TP, MODEL_PP and the MODEL_ARGS array; the run script then calls `skpo_launch "$@"`.
# srun executes this file on every node as `bash launch.sh node PROGRAM ARGS...`: each node builds its
# torchrun command with skpo_torchrun_cmd, the same function the dry run prints, and execs it.
#
# Options of the run scripts (environment variables in brackets):
#   --tp N, --pp N           tensor / pipeline parallel size [TP, PP] (default: the model file's)
#   --nodes N                nodes outside Slurm [NNODES] (inside a job: SLURM_JOB_NUM_NODES)
#   --gpus-per-node N        processes per node [GPUS_PER_NODE] (default: Slurm's GPU count, else 1)
#   --recipe FILE            training recipe [RECIPE] (default: the model file's)
#   --run-dir DIR            run directory; checkpoints in DIR/checkpoints [RUN_DIR]
#   --port N                 rendezvous port on the first node [SKPO_PORT] (default: 20000 + job id % 10000)
#   --dry-run                print the per-node torchrun commands and exit [SKPO_DRY_RUN=1]
#   key=value ...            further skpo-train overrides (after the model file's MODEL_ARGS)
# SKPO_TORCHRUN_SCRIPT=FILE makes torchrun run FILE instead of skpo-train (used by the Slurm test).

skpo_die() { echo "skpo-launch: error: $*" >&2; exit 2; }

skpo_parse_args() {
  SKPO_TP=${TP:-${MODEL_TP:-1}}
  SKPO_PP=${PP:-${MODEL_PP:-1}}
  SKPO_NNODES_ARG=${NNODES:-}
  SKPO_GPN=${GPUS_PER_NODE:-}
  SKPO_RECIPE=${RECIPE:-${MODEL_RECIPE:-}}
  SKPO_RUN_DIR=${RUN_DIR:-runs/${MODEL_NAME:-skpo}}
  SKPO_DRY_RUN=${SKPO_DRY_RUN:-0}
  SKPO_OVERRIDES=()
  while (($#)); do
    case $1 in
      --tp|--pp|--nodes|--gpus-per-node|--recipe|--run-dir|--port)
        (($# >= 2)) || skpo_die "$1 needs a value"
        case $1 in
          --tp) SKPO_TP=$2 ;; --pp) SKPO_PP=$2 ;; --nodes) SKPO_NNODES_ARG=$2 ;;
          --gpus-per-node) SKPO_GPN=$2 ;; --recipe) SKPO_RECIPE=$2 ;; --run-dir) SKPO_RUN_DIR=$2 ;;
          --port) SKPO_PORT=$2 ;;
        esac
        shift 2 ;;
      --dry-run) SKPO_DRY_RUN=1; shift ;;
      -h|--help) sed -n '/^# Options/,/^# SKPO_TORCHRUN/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *=*) SKPO_OVERRIDES+=("$1"); shift ;;
      *) skpo_die "unknown argument '$1' (options: --tp --pp --nodes --gpus-per-node --recipe --run-dir --port --dry-run, or key=value overrides)" ;;
    esac
  done
  [[ -n $SKPO_RECIPE ]] || skpo_die "no recipe: the model file sets MODEL_RECIPE, or pass --recipe FILE"
}

# Wrappers (scripts/convert.sh, scripts/eval.sh): split their own flags from the tool's arguments.
# Sets model_file (--model-file NAME), SKPO_DRY_RUN (--dry-run) and the array args (the rest).
skpo_wrapper_args() {
  model_file="" args=()
  while (($#)); do
    case $1 in
      --model-file) (($# >= 2)) || skpo_die "--model-file needs a name"; model_file=$2; shift 2 ;;
      --dry-run) SKPO_DRY_RUN=1; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
}

# Whether option $1 ("--x v" or "--x=v") is among the wrapper's args.
skpo_has_arg() { local a; for a in ${args[@]+"${args[@]}"}; do [[ $a == "$1" || $a == "$1="* ]] && return 0; done; return 1; }

skpo_is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# First host of a Slurm node list ("gpu[003-004,9],cpu1" -> "gpu003"): scontrol's answer when it has
# one (it needs a slurm.conf or a configless controller), else the same parsed here.
skpo_first_host() {
  local host=""
  if command -v scontrol >/dev/null 2>&1; then
    host=$(scontrol show hostnames "$1" 2>/dev/null | head -n 1) || true
  fi
  if [[ -z $host ]]; then
    host=${1%%,*}
    if [[ $1 == *"["* && ${1%%\[*} != *,* ]]; then  # the first entry has a bracketed range
      local prefix=${1%%\[*} inner=${1#*\[}
      inner=${inner%%\]*}; inner=${inner%%,*}; host=$prefix${inner%%-*}
    fi
  fi
  echo "$host"
}

# Cluster shape: SKPO_NNODES, SKPO_GPN, SKPO_MASTER, SKPO_PORT, SKPO_RDZV_ID, SKPO_DP.
skpo_cluster() {
  SKPO_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${SKPO_NNODES_ARG:-1}}}
  if [[ -z $SKPO_GPN ]]; then
    local g=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
    SKPO_GPN=${g##*:}  # "h100:8" -> 8
  fi
  for v in SKPO_NNODES SKPO_GPN SKPO_TP SKPO_PP; do
    skpo_is_count "${!v}" || skpo_die "${v#SKPO_} must be a positive integer, got '${!v}'"
  done
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    SKPO_MASTER=$(skpo_first_host "$SLURM_JOB_NODELIST")
  else
    SKPO_MASTER=${MASTER_ADDR:-$(hostname)}
  fi
  local job=${SLURM_JOB_ID:-0}
  SKPO_PORT=${SKPO_PORT:-$((20000 + job % 10000))}
  SKPO_RDZV_ID=${SLURM_JOB_ID:-skpo-local}
  local world=$((SKPO_NNODES * SKPO_GPN)) mp=$((SKPO_TP * SKPO_PP))
  ((world % mp == 0)) || skpo_die "world size $world ($SKPO_NNODES nodes x $SKPO_GPN) is not divisible by TP x PP = $mp"
  SKPO_DP=$((world / mp))
}

# The program torchrun runs on every rank, into SKPO_PROGRAM.
skpo_program() {
  if [[ -n ${SKPO_TORCHRUN_SCRIPT:-} ]]; then
    SKPO_PROGRAM=("$SKPO_TORCHRUN_SCRIPT")
    return
  fi
  SKPO_PROGRAM=(-m megatron_skpo.cli.train "$SKPO_RECIPE" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"}
    "parallel.tp=$SKPO_TP" "parallel.pp=$SKPO_PP" "logging.dir=$SKPO_RUN_DIR"
    "checkpoint.dir=$SKPO_RUN_DIR/checkpoints" checkpoint.resume=true "${SKPO_OVERRIDES[@]}")
}

# torchrun command of node NODE_RANK running PROGRAM..., into SKPO_CMD (needs the exported SKPO_* shape).
skpo_torchrun_cmd() {
  local node_rank=$1; shift
  SKPO_CMD=(torchrun "--nnodes=$SKPO_NNODES" "--nproc-per-node=$SKPO_GPN" "--node-rank=$node_rank"
    --rdzv-backend=c10d "--rdzv-endpoint=$SKPO_MASTER:$SKPO_PORT" "--rdzv-id=$SKPO_RDZV_ID"
    --max-restarts=0 "$@")
}

skpo_print_cmd() { printf '%q ' "$@" | sed 's/ $//'; echo; }

# A console script of the package, or `python -m MODULE` where it is not on PATH; into SKPO_TOOL.
skpo_tool() {
  if command -v "$1" >/dev/null 2>&1; then SKPO_TOOL=("$1"); else SKPO_TOOL=("${PYTHON:-python}" -m "$2"); fi
}

# Run (or with SKPO_DRY_RUN=1 print) a command.
skpo_run() {
  if [[ ${SKPO_DRY_RUN:-0} == 1 ]]; then skpo_print_cmd "$@"; else "$@"; fi
}

# Source scripts/models/NAME.sh (NAME or a path); dies naming the available models.
skpo_model_file() {
  local f=$1
  [[ -f $f ]] || f=$SKPO_LIB_DIR/../models/$1.sh
  if [[ ! -f $f ]]; then
    skpo_die "no model file '$1' (available: $(cd "$SKPO_LIB_DIR/../models" && ls *.sh | sed 's/\.sh$//' | tr '\n' ' '))"
  fi
  # shellcheck disable=SC1090
  source "$f"
}

skpo_srun_cmd() {
  SKPO_SRUN=(srun "--nodes=$SKPO_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
    bash "$SKPO_LIB_DIR/launch.sh" node)
}

skpo_report() {
  echo "skpo-launch: ${MODEL_NAME:-model} recipe=$SKPO_RECIPE nodes=$SKPO_NNODES gpus/node=$SKPO_GPN" \
       "tp=$SKPO_TP pp=$SKPO_PP dp=$SKPO_DP rdzv=$SKPO_MASTER:$SKPO_PORT run_dir=$SKPO_RUN_DIR"
  # rollout sharding (trainer/stages.py): world / rollout.tp vLLM engines, prompt i on engine i mod engines
  local rtp=1 arg world=$((SKPO_NNODES * SKPO_GPN))
  for arg in ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} ${SKPO_OVERRIDES[@]+"${SKPO_OVERRIDES[@]}"}; do
    [[ $arg == rollout.tp=* ]] && rtp=${arg#rollout.tp=}
  done
  echo "skpo-launch: rollouts on $((world / rtp)) vLLM engines (rollout.tp=$rtp), each generating" \
       "1/$((world / rtp)) of a step's prompts; updates on dp=$SKPO_DP model replicas"
  local latest=$SKPO_RUN_DIR/checkpoints/latest
  if [[ -f $latest ]]; then
    echo "skpo-launch: resuming from $SKPO_RUN_DIR/checkpoints/$(<"$latest") (restart ${SLURM_RESTART_COUNT:-0})"
  fi
}

# On the time-limit warning (#SBATCH --signal=B:USR1@...) requeue the job; it resumes from `latest`.
skpo_requeue() {
  echo "skpo-launch: USR1 near the time limit: requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
}

skpo_launch() {
  skpo_parse_args "$@"
  skpo_cluster
  skpo_program
  export SKPO_NNODES SKPO_GPN SKPO_MASTER SKPO_PORT SKPO_RDZV_ID
  skpo_report
  skpo_srun_cmd
  if [[ $SKPO_DRY_RUN == 1 ]]; then
    echo "# per job: $(skpo_print_cmd "${SKPO_SRUN[@]}" "${SKPO_PROGRAM[@]}")"
    local r
    for ((r = 0; r < SKPO_NNODES; r++)); do
      skpo_torchrun_cmd "$r" "${SKPO_PROGRAM[@]}"
      echo "# node $r: $(skpo_print_cmd "${SKPO_CMD[@]}")"
    done
    return 0
  fi
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    ((SKPO_NNODES == 1)) || skpo_die "$SKPO_NNODES nodes need Slurm: submit with sbatch (or pass --dry-run)"
    skpo_torchrun_cmd 0 "${SKPO_PROGRAM[@]}"
    exec "${SKPO_CMD[@]}"
  fi
  trap skpo_requeue USR1
  "${SKPO_SRUN[@]}" "${SKPO_PROGRAM[@]}" &
  local pid=$! rc=0
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # `wait` returned early for the USR1 trap: wait for srun itself
    rc=0
    wait "$pid" || rc=$?
  done
  return "$rc"
}

SKPO_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Executed by srun on every node: node rank from Slurm, then torchrun.
if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == node ]]; then
  shift
  skpo_torchrun_cmd "${SLURM_NODEID:-${SLURM_PROCID:-0}}" "$@"
  echo "skpo-launch: node ${SLURM_NODEID:-${SLURM_PROCID:-0}} on $(hostname): $(skpo_print_cmd "${SKPO_CMD[@]}")" >&2
  exec "${SKPO_CMD[@]}"
fi
