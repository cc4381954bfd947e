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
#   --port N                 rendezvous port on the first node [SKPO_PORT] (default: 20000 + job id % 10000);
#                            the rollout bridge uses the next two ports
#   --rollout-nodes N        disaggregated rollouts [ROLLOUT_NODES] (default 0: colocated): the last N nodes
#                            run vLLM rollout workers (skpo-rollout, one per rollout.tp GPUs), the others
#                            train; add rollout.max_staleness=1 to overlap generation and training
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
  SKPO_ROLLOUT_NODES=${ROLLOUT_NODES:-0}
  SKPO_OVERRIDES=()
  while (($#)); do
    case $1 in
      --tp|--pp|--nodes|--gpus-per-node|--recipe|--run-dir|--port|--rollout-nodes)
        (($# >= 2)) || skpo_die "$1 needs a value"
        case $1 in
          --tp) SKPO_TP=$2 ;; --pp) SKPO_PP=$2 ;; --nodes) SKPO_NNODES_ARG=$2 ;;
          --gpus-per-node) SKPO_GPN=$2 ;; --recipe) SKPO_RECIPE=$2 ;; --run-dir) SKPO_RUN_DIR=$2 ;;
          --port) SKPO_PORT=$2 ;; --rollout-nodes) SKPO_ROLLOUT_NODES=$2 ;;
        esac
        shift 2 ;;
      --dry-run) SKPO_DRY_RUN=1; shift ;;
      -h|--help) sed -n '/^# Options/,/^# SKPO_TORCHRUN/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *=*) SKPO_OVERRIDES+=("$1"); shift ;;
      *) skpo_die "unknown argument '$1' (options: --tp --pp --nodes --gpus-per-node --recipe --run-dir --port --rollout-nodes --dry-run, or key=value overrides)" ;;
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
  [[ $SKPO_ROLLOUT_NODES =~ ^[0-9]+$ ]] || skpo_die "--rollout-nodes must be a count, got '$SKPO_ROLLOUT_NODES'"
  SKPO_ALL_NODES=$SKPO_NNODES
  ((SKPO_ROLLOUT_NODES < SKPO_NNODES)) ||
    skpo_die "--rollout-nodes $SKPO_ROLLOUT_NODES leaves no training node of $SKPO_NNODES"
  SKPO_NNODES=$((SKPO_NNODES - SKPO_ROLLOUT_NODES))  # the trainer's nodes (the first ones)
  SKPO_RTP=1
  local arg
  for arg in ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} ${SKPO_OVERRIDES[@]+"${SKPO_OVERRIDES[@]}"}; do
    [[ $arg == rollout.tp=* ]] && SKPO_RTP=${arg#rollout.tp=}
  done
  ((SKPO_GPN % SKPO_RTP == 0)) || skpo_die "rollout.tp=$SKPO_RTP does not divide $SKPO_GPN GPUs per node"
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
  local placement=()
  if ((SKPO_ROLLOUT_NODES > 0)); then
    placement=(rollout.placement=disaggregated rollout.worker_launch=external
      "rollout.workers=$((SKPO_ROLLOUT_NODES * SKPO_GPN / SKPO_RTP))" "rollout.bridge_host=$SKPO_MASTER"
      "rollout.bridge_port=$((SKPO_PORT + 1))")
  fi
  SKPO_PROGRAM=(-m megatron_skpo.cli.train "$SKPO_RECIPE" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"}
    "parallel.tp=$SKPO_TP" "parallel.pp=$SKPO_PP" "logging.dir=$SKPO_RUN_DIR"
    "checkpoint.dir=$SKPO_RUN_DIR/checkpoints" checkpoint.resume=true ${placement[@]+"${placement[@]}"}
    "${SKPO_OVERRIDES[@]}")
  # each rollout node: GPUs/rollout.tp workers, worker i on GPUs [i*tp, (i+1)*tp)
  SKPO_ROLLOUT_PROGRAM=(-m megatron_skpo.trainer.worker --connect "$SKPO_MASTER:$((SKPO_PORT + 1))"
    --key-file "$SKPO_RUN_DIR/rollout_bridge.key")
}

# The rollout workers of one rollout node (executed there by srun): one per rollout.tp GPUs.
skpo_rollout_node() {
  local rtp=$1 gpn=$2; shift 2
  local i pids=() devices
  for ((i = 0; i < gpn / rtp; i++)); do
    devices=$(seq -s, $((i * rtp)) $((i * rtp + rtp - 1)))
    CUDA_VISIBLE_DEVICES=$devices "${PYTHON:-python}" "$@" &
    pids+=($!)
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  return "$rc"
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
  SKPO_SRUN_ROLLOUT=()
  if ((SKPO_ROLLOUT_NODES > 0)); then
    SKPO_SRUN=(srun "--nodes=$SKPO_NNODES" --relative=0 --ntasks-per-node=1 --kill-on-bad-exit=1
      bash "$SKPO_LIB_DIR/launch.sh" node)
    SKPO_SRUN_ROLLOUT=(srun "--nodes=$SKPO_ROLLOUT_NODES" "--relative=$SKPO_NNODES" --ntasks-per-node=1
      bash "$SKPO_LIB_DIR/launch.sh" rollout "$SKPO_RTP" "$SKPO_GPN")
  fi
}

skpo_report() {
  echo "skpo-launch: ${MODEL_NAME:-model} recipe=$SKPO_RECIPE nodes=$SKPO_ALL_NODES gpus/node=$SKPO_GPN" \
       "tp=$SKPO_TP pp=$SKPO_PP dp=$SKPO_DP rdzv=$SKPO_MASTER:$SKPO_PORT run_dir=$SKPO_RUN_DIR"
  # rollout sharding (trainer/stages.py): world / rollout.tp vLLM engines, prompt i on engine i mod engines
  local rtp=$SKPO_RTP world=$((SKPO_NNODES * SKPO_GPN))
  if ((SKPO_ROLLOUT_NODES > 0)); then
    local workers=$((SKPO_ROLLOUT_NODES * SKPO_GPN / rtp))
    echo "skpo-launch: disaggregated: training on the first $SKPO_NNODES node(s) ($world GPUs), rollouts on" \
         "the last $SKPO_ROLLOUT_NODES node(s): $workers vLLM rollout workers (rollout.tp=$rtp), each generating" \
         "1/$workers of a step's prompts, bridge $SKPO_MASTER:$((SKPO_PORT + 1)); updates on dp=$SKPO_DP model replicas"
  else
    echo "skpo-launch: rollouts on $((world / rtp)) vLLM engines (rollout.tp=$rtp), each generating" \
         "1/$((world / rtp)) of a step's prompts; updates on dp=$SKPO_DP model replicas"
  fi
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
    if ((SKPO_ROLLOUT_NODES > 0)); then
      echo "# rollout job step: $(skpo_print_cmd "${SKPO_SRUN_ROLLOUT[@]}" "${SKPO_ROLLOUT_PROGRAM[@]}")"
      for ((r = SKPO_NNODES; r < SKPO_ALL_NODES; r++)); do
        echo "# node $r: $((SKPO_GPN / SKPO_RTP)) x CUDA_VISIBLE_DEVICES=<rollout.tp GPUs>" \
             "$(skpo_print_cmd "${PYTHON:-python}" "${SKPO_ROLLOUT_PROGRAM[@]}")"
      done
    fi
    return 0
  fi
  ((SKPO_ROLLOUT_NODES == 0)) || [[ -n ${SLURM_JOB_ID:-} ]] || skpo_die "--rollout-nodes needs Slurm (submit with sbatch)"
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    ((SKPO_NNODES == 1)) || skpo_die "$SKPO_NNODES nodes need Slurm: submit with sbatch (or pass --dry-run)"
    skpo_torchrun_cmd 0 "${SKPO_PROGRAM[@]}"
    exec "${SKPO_CMD[@]}"
  fi
  trap skpo_requeue USR1
  local rollout_pid=""
  if ((SKPO_ROLLOUT_NODES > 0)); then  # the workers wait for the trainer's key file and bridge
    "${SKPO_SRUN_ROLLOUT[@]}" "${SKPO_ROLLOUT_PROGRAM[@]}" &
    rollout_pid=$!
  fi
  "${SKPO_SRUN[@]}" "${SKPO_PROGRAM[@]}" &
  local pid=$! rc=0
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # `wait` returned early for the USR1 trap: wait for srun itself
    rc=0
    wait "$pid" || rc=$?
  done
  if [[ -n $rollout_pid ]]; then  # the trainer closed the workers; end a straggler
    kill "$rollout_pid" 2>/dev/null || true
    wait "$rollout_pid" 2>/dev/null || true
  fi
  return "$rc"
}

SKPO_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Executed by srun on every rollout node: its rollout workers.
if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == rollout ]]; then
  shift
  skpo_rollout_node "$@"
  exit $?
fi

# Executed by srun on every node: node rank from Slurm, then torchrun.
if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == node ]]; then
  shift
  skpo_torchrun_cmd "${SLURM_NODEID:-${SLURM_PROCID:-0}}" "$@"
  echo "skpo-launch: node ${SLURM_NODEID:-${SLURM_PROCID:-0}} on $(hostname): $(skpo_print_cmd "${SKPO_CMD[@]}")" >&2
  exec "${SKPO_CMD[@]}"
fi
