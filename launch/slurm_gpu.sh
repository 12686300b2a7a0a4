#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch sized for N nodes x G GPUs, optionally as a chain of jobs that
# resume one another (each starts when the previous one has ended).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"  # quote, check_int, need_value

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/slurm_gpu.sh [options] -- TRAINER_ARGS...

Submits launch/slurm_gpu.sbatch with sbatch: `python -m marnet_jax.main TRAINER_ARGS` on every
process. TRAINER_ARGS must include --config and --workdir (on a filesystem every node shares).
Submits from the repository root, where the job runs and writes its log (<job name>-<job id>.out).

Options (environment variable in brackets):
  -N, --nodes N            nodes (default 2) [NODES]
  -g, --gpus-per-node G    GPUs per node (default 8) [GPUS_PER_NODE]
      --per-gpu            one process per GPU (default; the common JAX recipe)
      --per-node           one process per node, driving all its GPUs
  -c, --cpus-per-gpu C     CPU cores per GPU, for the input pipeline (default 8) [CPUS_PER_GPU]
  -t, --time T             time limit, e.g. 24:00:00 [TIME]
  -p, --partition P        partition [PARTITION]
  -A, --account A          account [ACCOUNT]
  -q, --qos Q              quality of service [QOS]
  -J, --job-name NAME      job name (default marnet) [JOB_NAME]
      --chain K            submit K jobs, each starting when the previous one has ended, however
                           it ended (afterany: time limit, pre-emption); each resumes from
                           --workdir, so long training survives time limits (default 1)
      --sbatch-arg ARG     extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)
      --dry-run            print the sbatch commands (one per line, '+ ') and submit nothing
                           [DRY_RUN=1]
  -h, --help               show this help
The job reads MARNET_VENV, MARNET_PYTHON, MARNET_DIR and MARNET_COORDINATOR_PORT from this shell
(see `bash launch/slurm_gpu.sbatch --help`).

Examples:
  # 2 nodes x 8 GPUs, 16 processes, three 24 h jobs in a row.
  MARNET_VENV=$PWD/.venv launch/slurm_gpu.sh -N 2 -g 8 -p gpu -t 24:00:00 --chain 3 -- \
    --config configs/tiny.py --workdir /shared/runs/tiny --config.train.num_steps=100000
  # 4 nodes, one process per node.
  launch/slurm_gpu.sh -N 4 --per-node -- --config configs/tiny.py --workdir /shared/runs/tiny
EOF
}

die_usage() {
  echo "Usage: launch/slurm_gpu.sh [options] -- TRAINER_ARGS..." >&2
  echo "slurm_gpu.sh: $*" >&2
  echo "Run 'launch/slurm_gpu.sh --help' for usage." >&2
  exit 2
}

NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
CPUS_PER_GPU="${CPUS_PER_GPU:-8}"
TIME="${TIME:-}"
PARTITION="${PARTITION:-}"
ACCOUNT="${ACCOUNT:-}"
QOS="${QOS:-}"
JOB_NAME="${JOB_NAME:-marnet}"
DRY_RUN="${DRY_RUN:-0}"
PROCS_PER=gpu
CHAIN=1
EXTRA=()


while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -N | --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    -g | --gpus-per-node) need_value "$@"; GPUS_PER_NODE="$2"; shift 2 ;;
    --per-gpu) PROCS_PER=gpu; shift ;;
    --per-node) PROCS_PER=node; shift ;;
    -c | --cpus-per-gpu) need_value "$@"; CPUS_PER_GPU="$2"; shift 2 ;;
    -t | --time) need_value "$@"; TIME="$2"; shift 2 ;;
    -p | --partition) need_value "$@"; PARTITION="$2"; shift 2 ;;
    -A | --account) need_value "$@"; ACCOUNT="$2"; shift 2 ;;
    -q | --qos) need_value "$@"; QOS="$2"; shift 2 ;;
    -J | --job-name) need_value "$@"; JOB_NAME="$2"; shift 2 ;;
    --chain) need_value "$@"; CHAIN="$2"; shift 2 ;;
    --sbatch-arg) need_value "$@"; EXTRA+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown argument '$1' (trainer arguments go after '--')" ;;
  esac
done
ARGS=("$@")

check_int --nodes "$NODES" 1
check_int --gpus-per-node "$GPUS_PER_NODE" 1
check_int --cpus-per-gpu "$CPUS_PER_GPU" 1
check_int --chain "$CHAIN" 1
NODES=$((10#$NODES)) GPUS_PER_NODE=$((10#$GPUS_PER_NODE)) CPUS_PER_GPU=$((10#$CPUS_PER_GPU))
CHAIN=$((10#$CHAIN))
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die_usage "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
for extra in "${EXTRA[@]}"; do
  [[ "$extra" == -* ]] || die_usage "--sbatch-arg takes an sbatch option such as --exclusive, got '$extra'"
done
has_config=0
has_workdir=0
for arg in "${ARGS[@]}"; do
  [[ "$arg" == --config || "$arg" == --config=* ]] && has_config=1
  [[ "$arg" == --workdir || "$arg" == --workdir=* ]] && has_workdir=1
done
((has_config)) || die_usage "missing --config configs/NAME.py[:arg] after '--'"
((has_workdir)) || die_usage "missing --workdir DIR after '--'"

if [[ "$PROCS_PER" == gpu ]]; then
  layout=("--ntasks-per-node=$GPUS_PER_NODE" "--cpus-per-task=$CPUS_PER_GPU")
else
  layout=(--ntasks-per-node=1 "--cpus-per-task=$((CPUS_PER_GPU * GPUS_PER_NODE))")
fi
SBATCH=(sbatch --parsable "--job-name=$JOB_NAME" "--nodes=$NODES" "--gpus-per-node=$GPUS_PER_NODE"
  "${layout[@]}" "--export=ALL,MARNET_PROCS_PER=$PROCS_PER")
[[ -n "$TIME" ]] && SBATCH+=("--time=$TIME")
[[ -n "$PARTITION" ]] && SBATCH+=("--partition=$PARTITION")
[[ -n "$ACCOUNT" ]] && SBATCH+=("--account=$ACCOUNT")
[[ -n "$QOS" ]] && SBATCH+=("--qos=$QOS")
SBATCH+=("${EXTRA[@]}")

# Submit from the repository root: the job runs there (SLURM_SUBMIT_DIR) and writes its log there.
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
if [[ "$DRY_RUN" == 1 ]]; then echo "+ $(quote cd "$REPO_ROOT")"; else echo "+ $(quote cd "$REPO_ROOT")" >&2; fi
cd "$REPO_ROOT"
previous=""
for ((job = 1; job <= CHAIN; job++)); do
  cmd=("${SBATCH[@]}")
  [[ -n "$previous" ]] && cmd+=("--dependency=afterany:$previous")
  cmd+=(launch/slurm_gpu.sbatch -- "${ARGS[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "${cmd[@]}")"
    previous="JOB$job"
  else
    echo "+ $(quote "${cmd[@]}")" >&2
    out="$("${cmd[@]}")"
    previous="${out%%;*}"
    echo "slurm_gpu.sh: submitted job $previous ($job of $CHAIN)" >&2
    echo "$previous"
  fi
done
