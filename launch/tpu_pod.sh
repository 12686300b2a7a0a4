#!/usr/bin/env bash
# Cloud TPU VMs and pod slices with gcloud: create, set up, train on every worker, logs, stop, delete.
# Every worker runs the same `python -m marnet_jax.main ...`; see usage() for the details.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"  # quote, check_int, need_value

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [options] [-- ARGS...]

Commands:
  create   create the TPU VM / pod slice        (--accelerator-type, --runtime-version, --spot,
                                                 --preemptible; ARGS: extra `gcloud ... create` flags)
  setup    on all workers: copy this checkout (or git clone --repo URL), create a Python venv with
           uv, pip install -r requirements.txt plus jax[tpu] pinned to requirements.txt's jax
  sync     on all workers: only copy the code again (after local edits)
  run      first, on this machine (from the repository root): `python -m marnet_jax.preflight`
           compiles the train step of the --config in ARGS for the slice's chips (the type from
           --accelerator-type, else from gcloud describe) and stops if it cannot run there
           (--skip-preflight: do not); then on all workers: start `python -m marnet_jax.main ARGS`
           in the background (nohup), each worker's output to ~/marnet_logs/RUN_NAME.log; then
           stream worker 0's log (Ctrl-C stops the streaming, not the training). ARGS must include
           --config and --workdir; the workdir must be gs://... or an absolute path on a
           filesystem shared by all workers.
  logs     stream a worker's log of the latest (or --run-name) run; --worker all: every worker's
  stop     send SIGTERM to the trainer on all workers: it saves a checkpoint and exits 0
           (--force: SIGKILL). A later `run` with the same --workdir resumes.
  delete   delete the TPU VM / pod slice (gcloud asks to confirm unless --yes)
  exec     run a shell command on workers (default all) in the code folder with the venv active;
           the words after -- are joined by spaces, as ssh does

Options (environment variable in brackets):
  --project ID             Google Cloud project (default: gcloud's configured one) [PROJECT]
  --zone ZONE              zone, e.g. us-central2-b (default: gcloud's compute/zone) [ZONE]
  --name NAME              TPU VM name (required) [TPU_NAME]
  --accelerator-type TYPE  create, run: e.g. v4-32, v5litepod-16, v5p-32, v6e-16 [ACCELERATOR_TYPE]
  --runtime-version V      create: TPU software version [RUNTIME_VERSION]; default from the type:
                           v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot | --preemptible   create: Spot / preemptible capacity (training resumes from --workdir)
  --repo URL               setup/sync: git clone URL on the workers instead of copying [REPO_URL]
  --ref REF                setup/sync with --repo: branch, tag or commit to check out [REPO_REF]
  --python VERSION         setup: Python of the venv (default 3.11) [PYTHON_VERSION]
  --pip PACKAGE            setup: also pip install PACKAGE (repeatable), e.g. --pip gcsfs, which
                           etils/orbax need for gs:// paths when TensorFlow is not installed
  --env KEY=VALUE          run: export to the trainer on every worker (repeatable), e.g.
                           --env MARNET_DATA_DIR=/home/me/tfds
  --run-name NAME          run/logs: log name (default for run: run_<date>_<time>; logs: latest)
  --detach                 run: do not stream worker 0's log
  --skip-preflight         run: start without compiling for the slice first
  --worker N|all           logs (default 0) / exec (default all): which workers
  --force                  stop: SIGKILL instead of SIGTERM
  --yes                    delete: no confirmation prompt
  --dry-run                print every command (one per line, prefixed '+ ') and run nothing
                           [DRY_RUN=1]
  -h, --help               show this help
Also: REMOTE_DIR (code folder on the workers, relative to home; default marnet_jax; replaced by
setup/sync), REMOTE_VENV (default marnet_venv), GCLOUD (default gcloud), GCLOUD_SSH_FLAGS (extra
flags for gcloud ssh/scp, e.g. "--internal-ip" or "--tunnel-through-iap").

Multi-host start-up: `run` exports JAX_COORDINATOR_ADDRESS (worker 0, port 8482),
JAX_NUM_PROCESSES (number of workers) and JAX_PROCESS_ID (this worker) from the TPU VM metadata
server on each worker; marnet_jax.main passes them to jax.distributed.initialize().

Examples:
  export PROJECT=my-project ZONE=us-central2-b TPU_NAME=marnet-v4
  launch/tpu_pod.sh create --accelerator-type v4-32 --spot
  launch/tpu_pod.sh setup
  # Every worker builds the synthetic data on its own disk (~/tensorflow_datasets).
  launch/tpu_pod.sh run -- --config configs/tiny.py --workdir gs://my-bucket/marnet/tiny \
    --config.data.build_on_all_processes=True --config.train.num_steps=1000
  launch/tpu_pod.sh logs --worker all
  launch/tpu_pod.sh stop
  launch/tpu_pod.sh delete
  launch/tpu_pod.sh run --dry-run -- --config configs/tiny.py --workdir gs://b/run   # show only
EOF
}

die_usage() {
  echo "Usage: launch/tpu_pod.sh COMMAND [options] [-- ARGS...]" >&2
  echo "tpu_pod.sh: $*" >&2
  echo "Run 'launch/tpu_pod.sh --help' for usage." >&2
  exit 2
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

# Prints a '+ ' line: on stdout in a dry run (that is its output), else on stderr (a trace).
show() {
  if [[ "$DRY_RUN" == 1 ]]; then echo "+ $*"; else echo "+ $*" >&2; fi
}

# Prints the command and runs it, unless this is a dry run.
run() {
  show "$(quote "$@")"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

# A path under the remote user's home, for a remote bash command line.
# shellcheck disable=SC2016  # $HOME is for the remote shell
rhome() { printf '"$HOME"/%s' "$(quote "$1")"; }

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
REMOTE_DIR="${REMOTE_DIR:-marnet_jax}"
REMOTE_VENV="${REMOTE_VENV:-marnet_venv}"
REMOTE_LOGS="marnet_logs"
GCLOUD="${GCLOUD:-gcloud}"
DRY_RUN="${DRY_RUN:-0}"
CAPACITY=""
RUN_NAME=""
DETACH=0
SKIP_PREFLIGHT=0
LOCAL_PYTHON="${LOCAL_PYTHON:-python3}"
WORKER=""
FORCE=0
YES=0
ENV_VARS=()
PIP_EXTRA=()
GIVEN=()  # subcommand-specific options given, checked against the subcommand below

[[ $# -gt 0 ]] || die_usage "missing COMMAND"
case "$1" in
  -h | --help) usage; exit 0 ;;
  create | setup | sync | run | logs | stop | delete | exec) COMMAND="$1"; shift ;;
  *) die_usage "unknown command '$1'" ;;
esac


while [[ $# -gt 0 ]]; do
  opt="$1"
  value=""
  if [[ "$opt" == --*=* ]]; then
    value="${opt#*=}"
    opt="${opt%%=*}"
    set -- "$opt" "$value" "${@:2}"
  fi
  case "$opt" in
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --name) need_value "$@"; TPU_NAME="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; GIVEN+=("$opt"); shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION="$2"; GIVEN+=("$opt"); shift 2 ;;
    --spot | --preemptible)
      [[ -z "$CAPACITY" || "$CAPACITY" == "$opt" ]] || die_usage "give only one of --spot and --preemptible"
      CAPACITY="$opt"; GIVEN+=("$opt"); shift ;;
    --repo) need_value "$@"; REPO_URL="$2"; GIVEN+=("$opt"); shift 2 ;;
    --ref) need_value "$@"; REPO_REF="$2"; GIVEN+=("$opt"); shift 2 ;;
    --python) need_value "$@"; PYTHON_VERSION="$2"; GIVEN+=("$opt"); shift 2 ;;
    --env) need_value "$@"; ENV_VARS+=("$2"); GIVEN+=("$opt"); shift 2 ;;
    --pip) need_value "$@"; PIP_EXTRA+=("$2"); GIVEN+=("$opt"); shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME="$2"; GIVEN+=("$opt"); shift 2 ;;
    --detach) DETACH=1; GIVEN+=("$opt"); shift ;;
    --skip-preflight) SKIP_PREFLIGHT=1; GIVEN+=("$opt"); shift ;;
    --worker) need_value "$@"; WORKER="$2"; GIVEN+=("$opt"); shift 2 ;;
    --force) FORCE=1; GIVEN+=("$opt"); shift ;;
    --yes) YES=1; GIVEN+=("$opt"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown argument '$1' for '$COMMAND' (trainer arguments go after '--')" ;;
  esac
done
ARGS=("$@")

# Which subcommand-specific options each command takes, and whether it takes ARGS after '--'.
case "$COMMAND" in
  create) allowed="--accelerator-type --runtime-version --spot --preemptible"; takes_args=1 ;;
  setup) allowed="--repo --ref --python --pip"; takes_args=0 ;;
  sync) allowed="--repo --ref"; takes_args=0 ;;
  run) allowed="--env --run-name --detach --skip-preflight --accelerator-type"; takes_args=1 ;;
  logs) allowed="--run-name --worker"; takes_args=0 ;;
  stop) allowed="--force"; takes_args=0 ;;
  delete) allowed="--yes"; takes_args=1 ;;
  exec) allowed="--worker"; takes_args=1 ;;
esac
for opt in "${GIVEN[@]}"; do
  [[ " $allowed " == *" $opt "* ]] || die_usage "option $opt does not apply to '$COMMAND'"
done
((takes_args)) || [[ ${#ARGS[@]} -eq 0 ]] || die_usage "'$COMMAND' takes no arguments after '--' (got '${ARGS[0]}')"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die_usage "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[[ -n "$TPU_NAME" ]] || die_usage "no TPU name: give --name NAME or set TPU_NAME"
[[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die_usage "--name must be lower-case letters, digits and '-', starting with a letter, got '$TPU_NAME'"
[[ -z "$RUN_NAME" || "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] ||
  die_usage "--run-name may hold only letters, digits, '.', '_' and '-', got '$RUN_NAME'"
[[ -z "$WORKER" || "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] ||
  die_usage "--worker must be a worker number or 'all', got '$WORKER'"
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || die_usage "--python must look like 3.11, got '$PYTHON_VERSION'"
for dir in "$REMOTE_DIR" "$REMOTE_VENV"; do  # relative to home; setup/sync replace REMOTE_DIR
  [[ "$dir" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
    die_usage "REMOTE_DIR and REMOTE_VENV must be plain folder names under home, got '$dir'"
done
[[ -z "$REPO_REF" || -n "$REPO_URL" ]] || die_usage "--ref needs --repo URL"
for package in "${PIP_EXTRA[@]}"; do
  [[ "$package" != -* ]] || die_usage "--pip takes a package (requirement), got '$package'"
done
for kv in "${ENV_VARS[@]}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env needs KEY=VALUE, got '$kv'"
done
read -r -a SSH_FLAGS <<<"${GCLOUD_SSH_FLAGS:-}"

TPU=("$GCLOUD" compute tpus tpu-vm)
LOCATION=()
[[ -n "$ZONE" ]] && LOCATION+=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=("--project=$PROJECT")

# ssh_workers WORKERS SCRIPT: runs a POSIX sh command line on the workers (in their login shell).
ssh_workers() {
  run "${TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$1" "${SSH_FLAGS[@]}" "--command=$2"
}

# The jax version pinned in requirements.txt (jax[tpu] gets the same, so libtpu matches jaxlib).
jax_version() {
  local version
  version="$(sed -n 's/^jax==\([^[:space:]#;]*\).*/\1/p' "$REPO_ROOT/requirements.txt")"
  [[ -n "$version" ]] || die "no 'jax==VERSION' line in $REPO_ROOT/requirements.txt"
  printf '%s' "$version"
}

default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die_usage "no default runtime for accelerator type '$1': give --runtime-version" ;;
  esac
}

cmd_create() {
  [[ -n "$ACCELERATOR_TYPE" ]] || die_usage "create needs --accelerator-type (or ACCELERATOR_TYPE)"
  [[ "$ACCELERATOR_TYPE" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die_usage "--accelerator-type looks like v4-32 or v5litepod-16, got '$ACCELERATOR_TYPE'"
  local version capacity=()
  version="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"
  [[ -n "$CAPACITY" ]] && capacity=("$CAPACITY")
  run "${TPU[@]}" create "$TPU_NAME" "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--version=$version" "${capacity[@]}" "${ARGS[@]}"
}

# Puts the code in ~/REMOTE_DIR on every worker (replacing it): a tarball of this checkout (its
# tracked and untracked-but-not-ignored files, as they are on disk) or a git clone of --repo.
cmd_sync() {
  local dir
  dir="$(rhome "$REMOTE_DIR")"
  if [[ -n "$REPO_URL" ]]; then
    local checkout=""
    [[ -n "$REPO_REF" ]] && checkout="; git -C $dir checkout --quiet $(quote "$REPO_REF")"
    ssh_workers all "set -eu; rm -rf $dir; git clone --quiet $(quote "$REPO_URL") $dir$checkout"
    return
  fi
  local tarball="${TMPDIR:-/tmp}/marnet_jax_src_$$.tgz" remote_tgz="${REMOTE_DIR//\//_}_src.tgz"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    show "$(quote git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)" \
      "| (the files that exist) | $(quote tar -C "$REPO_ROOT" --null -T - -czf "$tarball")"
    if [[ "$DRY_RUN" == 0 ]]; then
      trap 'rm -f "$tarball"' EXIT
      git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e "$REPO_ROOT/$f" ]] && printf '%s\0' "$f"; done |
        tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
    fi
  else
    [[ "$DRY_RUN" == 1 ]] || trap 'rm -f "$tarball"' EXIT
    run tar -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ --exclude=.venv -czf "$tarball" .
  fi
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:$remote_tgz" "${LOCATION[@]}" --worker=all "${SSH_FLAGS[@]}"
  ssh_workers all "set -eu; rm -rf $dir; mkdir -p $dir; tar -xzf $(rhome "$remote_tgz") -C $dir; rm -f $(rhome "$remote_tgz")"
}

cmd_setup() {
  cmd_sync
  local version venv python packages
  version="$(jax_version)"
  packages="$(quote "jax[tpu]==$version" "${PIP_EXTRA[@]}")"
  venv="$(rhome "$REMOTE_VENV")"
  python="$(rhome "$REMOTE_VENV/bin/python")"
  # shellcheck disable=SC2016  # $-expressions in single quotes are for the remote shell
  ssh_workers all "$(printf 'set -eu; cd %s; grep -qx %s requirements.txt || { echo "$(hostname): requirements.txt does not pin %s" >&2; exit 1; }; export PATH="$HOME/.local/bin:$PATH"; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; uv venv --allow-existing --python %s %s; uv pip install --python %s -r requirements.txt %s; %s -c %s' \
    "$(rhome "$REMOTE_DIR")" "$(quote "jax==$version")" "jax==$version" \
    "$(quote "$PYTHON_VERSION")" "$venv" "$python" "$packages" "$python" \
    "$(quote 'import jax, flax, optax, orbax.checkpoint, grain; print(jax.__version__)')")"
}

# Finds --workdir in the trainer arguments and checks that every worker can reach it.
check_workdir() {
  local i workdir=""
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[$i]}" in
      --workdir=*) workdir="${ARGS[$i]#--workdir=}" ;;
      --workdir) workdir="${ARGS[$((i + 1))]:-}" ;;
    esac
  done
  [[ -n "$workdir" ]] || die_usage "run needs --workdir DIR after '--' (gs://... or a shared absolute path)"
  case "$workdir" in
    gs://*) ;;
    /*) echo "tpu_pod.sh: note: $workdir must be on a filesystem that every worker shares" >&2 ;;
    *) die_usage "--workdir must be gs://... or an absolute path shared by all workers, got '$workdir'" ;;
  esac
}

# Compiles the trainer's config (its --config and --config.* arguments) for the slice's chips on this
# machine: a batch that does not divide, a mesh that does not match or a step that does not fit in
# HBM stops here, before the workers start.
preflight() {
  local type="$ACCELERATOR_TYPE" args=() i arg
  if [[ -z "$type" ]]; then
    local describe=("${TPU[@]}" describe "$TPU_NAME" "${LOCATION[@]}" "--format=value(acceleratorType)")
    show "$(quote "${describe[@]}")"
    if [[ "$DRY_RUN" == 1 ]]; then type="ACCELERATOR_TYPE"; else type="$("${describe[@]}")"; fi
  fi
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    arg="${ARGS[$i]}"
    case "$arg" in
      --config=* | --config.*=*) args+=("$arg") ;;
      --config | --config.*) args+=("$arg" "${ARGS[$((i + 1))]:-}"); i=$((i + 1)) ;;
    esac
  done
  run "$LOCAL_PYTHON" -m marnet_jax.preflight "${args[@]}" "--topology=$type" ||
    die "the preflight for $type failed (above); fix the config, or start anyway with --skip-preflight"
}

cmd_run() {
  [[ ${#ARGS[@]} -gt 0 ]] || die_usage "run needs the trainer arguments after '--' (--config ... --workdir ...)"
  local has_config=0 arg
  for arg in "${ARGS[@]}"; do [[ "$arg" == --config || "$arg" == --config=* ]] && has_config=1; done
  ((has_config)) || die_usage "run needs --config configs/NAME.py[:arg] after '--'"
  check_workdir
  ((SKIP_PREFLIGHT)) || preflight
  local name="${RUN_NAME:-run_$(date +%Y%m%d_%H%M%S)}" logs exports="PYTHONUNBUFFERED=1" kv
  logs="$(rhome "$REMOTE_LOGS")"
  for package in "${PIP_EXTRA[@]}"; do
  [[ "$package" != -* ]] || die_usage "--pip takes a package (requirement), got '$package'"
done
for kv in "${ENV_VARS[@]}"; do exports+=" $(quote "$kv")"; done
  # On each worker: refuse while a trainer still runs; read this worker's number and all workers'
  # addresses from the metadata server (worker 0 coordinates, as jax's own TPU detection does);
  # start the trainer detached from the ssh session; record its pid and log.
  # shellcheck disable=SC2016  # $-expressions in single quotes are for the remote shell
  ssh_workers all "$(printf 'set -eu; cd %s; mkdir -p %s; if [ -f %s/latest.pid ] && kill -0 "$(cat %s/latest.pid)" 2>/dev/null; then echo "$(hostname): a trainer is still running; stop it first (tpu_pod.sh stop)" >&2; exit 1; fi; md() { curl -sSf --retry 5 -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; endpoints="$(md worker-network-endpoints)"; worker="$(md agent-worker-number)"; first="${endpoints%%%%,*}"; count="$(echo "$endpoints" | tr , "\\n" | grep -c .)"; export JAX_COORDINATOR_ADDRESS="${first##*:}:8482" JAX_NUM_PROCESSES="$count" JAX_PROCESS_ID="$worker"; export %s; nohup %s -m marnet_jax.main %s > %s/%s.log 2>&1 < /dev/null & echo $! > %s/%s.pid; ln -sfn %s.log %s/latest.log; ln -sfn %s.pid %s/latest.pid; echo "$(hostname): worker $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator $JAX_COORDINATOR_ADDRESS, pid $(cat %s/%s.pid), log ~/%s/%s.log"' \
    "$(rhome "$REMOTE_DIR")" "$logs" "$logs" "$logs" "$exports" "$(rhome "$REMOTE_VENV/bin/python")" \
    "$(quote "${ARGS[@]}")" "$logs" "$name" "$logs" "$name" "$name" "$logs" "$name" "$logs" \
    "$logs" "$name" "$REMOTE_LOGS" "$name")"
  if ((DETACH)); then
    echo "tpu_pod.sh: started '$name'; follow it with: launch/tpu_pod.sh logs" >&2
    return
  fi
  echo "tpu_pod.sh: streaming worker 0's log (Ctrl-C stops the streaming, not the training)" >&2
  ssh_workers 0 "$(tail_command "$name")"
}

# A remote command that prints a run's log and follows it while its trainer runs.
tail_command() {
  local logs
  logs="$(rhome "$REMOTE_LOGS")"
  # shellcheck disable=SC2016  # $-expressions in single quotes are for the remote shell
  printf 'f=%s/%s.log; p=%s/%s.pid; n=0; while [ ! -e "$f" ] && [ $n -lt 30 ]; do sleep 1; n=$((n+1)); done; [ -e "$f" ] || { echo "$(hostname): no log $f" >&2; exit 1; }; pid="$(cat "$p" 2>/dev/null || true)"; tail -n +1 -F ${pid:+--pid=$pid} "$f"' \
    "$logs" "$1" "$logs" "$1"
}

cmd_logs() {
  local worker="${WORKER:-0}" remote
  remote="$(tail_command "${RUN_NAME:-latest}")"
  # shellcheck disable=SC2016  # for the remote shell
  [[ "$worker" == all ]] && remote="$remote | sed -u \"s/^/[\$(hostname)] /\""
  ssh_workers "$worker" "$remote"
}

cmd_stop() {
  local signal=TERM
  ((FORCE)) && signal=KILL
  # shellcheck disable=SC2016  # $-expressions in single quotes are for the remote shell
  ssh_workers all "$(printf 'p=%s/latest.pid; if [ -f "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null; then kill -%s "$(cat "$p")"; echo "$(hostname): sent SIG%s to pid $(cat "$p")"; else echo "$(hostname): no trainer running"; fi' \
    "$(rhome "$REMOTE_LOGS")" "$signal" "$signal")"
  ((FORCE)) || echo "tpu_pod.sh: each trainer saves a checkpoint, then exits; watch: launch/tpu_pod.sh logs" >&2
}

cmd_delete() {
  local yes=()
  ((YES)) && yes=(--quiet)
  run "${TPU[@]}" delete "$TPU_NAME" "${LOCATION[@]}" "${yes[@]}" "${ARGS[@]}"
}

cmd_exec() {
  [[ ${#ARGS[@]} -gt 0 ]] || die_usage "exec needs a command after '--'"
  ssh_workers "${WORKER:-all}" "cd $(rhome "$REMOTE_DIR") && export VIRTUAL_ENV=\"\$HOME/$REMOTE_VENV\" PATH=\"\$HOME/$REMOTE_VENV/bin:\$PATH\" && ${ARGS[*]}"
}

"cmd_$COMMAND"
