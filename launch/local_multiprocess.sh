#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine (CPU, loopback only), for testing
# multi-process code without a cluster. See usage() for the environment each process gets.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"  # quote, check_int, need_value

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [options] -- COMMAND [ARGS...]

Starts COMMAND as N JAX processes on this machine, each with M fake CPU devices, coordinated over
127.0.0.1 only. Each process's stdout and stderr go to LOG_DIR/process_<i>.log. Waits for all of
them; if one fails, the others are stopped; everything is stopped after the timeout.

Each process gets this environment (marnet_jax.main reads it and calls jax.distributed.initialize):
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT
  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=<0..N-1>  JAX_NUM_CPU_DEVICES=M  JAX_PLATFORMS=cpu
  JAX_INIT_TIMEOUT=<seconds>
Other programs: jax.distributed.initialize(num_processes=int(os.environ['JAX_NUM_PROCESSES']),
process_id=int(os.environ['JAX_PROCESS_ID'])) (JAX reads the coordinator and bind address itself).

Options (environment variable in brackets):
  -n, --num-processes N        processes to start, >= 1 (default 2) [NUM_PROCESSES]
  -m, --devices-per-process M  fake CPU devices per process, >= 1 (default 4) [DEVICES_PER_PROCESS]
  -p, --port PORT              coordinator port on 127.0.0.1 (default: a free port) [COORDINATOR_PORT]
  -l, --log-dir DIR            where process_<i>.log go (default: a new folder under ${TMPDIR:-/tmp})
                               [LOG_DIR]
  -t, --timeout SECONDS        stop everything after this long, exit 124 (default 900) [TIMEOUT]
      --init-timeout SECONDS   JAX_INIT_TIMEOUT, how long processes wait for each other (default 120)
  -f, --follow                 also stream process 0's output to this terminal
      --dry-run                print the commands (one per line, prefixed '+ ') and run nothing
                               [DRY_RUN=1]
  -h, --help                   show this help

Exit status: 0 when every process exits 0; otherwise the first failure's status (124: timeout).

Examples:
  # Two processes with 4 CPU devices each train the tiny config (8 global devices).
  launch/local_multiprocess.sh -n 2 -m 4 -- \
    python -m marnet_jax.main --config configs/tiny.py --workdir /tmp/marnet_mp \
    --config.data.build_on_all_processes=True

  # Check the wiring with a bare JAX program.
  launch/local_multiprocess.sh -n 2 -m 2 -t 120 -- python -c 'import os, jax;
  jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                             process_id=int(os.environ["JAX_PROCESS_ID"]));
  print(jax.process_index(), jax.process_count(), jax.device_count())'
EOF
}

die_usage() {
  echo "Usage: launch/local_multiprocess.sh [options] -- COMMAND [ARGS...]" >&2
  echo "local_multiprocess.sh: $*" >&2
  echo "Run 'launch/local_multiprocess.sh --help' for usage." >&2
  exit 2
}

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
COORDINATOR_PORT="${COORDINATOR_PORT:-}"
LOG_DIR="${LOG_DIR:-}"
TIMEOUT="${TIMEOUT:-900}"
INIT_TIMEOUT="${INIT_TIMEOUT:-120}"
DRY_RUN="${DRY_RUN:-0}"
FOLLOW=0


while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --num-processes) need_value "$@"; NUM_PROCESSES="$2"; shift 2 ;;
    --num-processes=*) NUM_PROCESSES="${1#*=}"; shift ;;
    -m | --devices-per-process) need_value "$@"; DEVICES_PER_PROCESS="$2"; shift 2 ;;
    --devices-per-process=*) DEVICES_PER_PROCESS="${1#*=}"; shift ;;
    -p | --port) need_value "$@"; COORDINATOR_PORT="$2"; shift 2 ;;
    --port=*) COORDINATOR_PORT="${1#*=}"; shift ;;
    -l | --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
    --log-dir=*) LOG_DIR="${1#*=}"; shift ;;
    -t | --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --init-timeout) need_value "$@"; INIT_TIMEOUT="$2"; shift 2 ;;
    --init-timeout=*) INIT_TIMEOUT="${1#*=}"; shift ;;
    -f | --follow) FOLLOW=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown argument '$1' (put the command after '--')" ;;
  esac
done

[[ $# -gt 0 ]] || die_usage "missing COMMAND after '--'"
check_int --num-processes "$NUM_PROCESSES" 1
check_int --devices-per-process "$DEVICES_PER_PROCESS" 1
check_int --timeout "$TIMEOUT" 1
check_int --init-timeout "$INIT_TIMEOUT" 1
NUM_PROCESSES=$((10#$NUM_PROCESSES)) DEVICES_PER_PROCESS=$((10#$DEVICES_PER_PROCESS))
TIMEOUT=$((10#$TIMEOUT)) INIT_TIMEOUT=$((10#$INIT_TIMEOUT))
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die_usage "DRY_RUN must be 0 or 1, got '$DRY_RUN'"

# A port nothing listens on (bash's /dev/tcp connect fails), from the ephemeral-free range.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -z "$COORDINATOR_PORT" ]]; then
  for _ in $(seq 50); do
    COORDINATOR_PORT=$((20000 + RANDOM % 12000))
    port_in_use "$COORDINATOR_PORT" || break
  done
fi
check_int --port "$COORDINATOR_PORT" 1 65535
COORDINATOR_PORT=$((10#$COORDINATOR_PORT))
if [[ "$DRY_RUN" == 0 ]] && port_in_use "$COORDINATOR_PORT"; then
  echo "local_multiprocess.sh: port $COORDINATOR_PORT on 127.0.0.1 is already in use" >&2
  exit 1
fi

LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/marnet_mp_$(date +%Y%m%d_%H%M%S)_$$}"

# gRPC honours proxy variables: keep the loopback coordinator off any proxy.
has_proxy=0
while IFS= read -r name; do [[ "${name,,}" == *_proxy ]] && has_proxy=1; done < <(compgen -e)
if ((has_proxy)); then
  export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
  export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
fi

ADDRESS="127.0.0.1:$COORDINATOR_PORT"
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)  # own process group: stopping reaches its children

# Sets CMD to the command line of process $1 running the command ${@:2}.
build_command() {
  CMD=("${SETSID[@]}" env
    "JAX_PLATFORMS=cpu"
    "JAX_NUM_CPU_DEVICES=$DEVICES_PER_PROCESS"
    "JAX_COORDINATOR_ADDRESS=$ADDRESS"
    "JAX_COORDINATOR_BIND_ADDRESS=$ADDRESS"
    "JAX_NUM_PROCESSES=$NUM_PROCESSES"
    "JAX_PROCESS_ID=$1"
    "JAX_INIT_TIMEOUT=$INIT_TIMEOUT"
    "${@:2}")
}

if [[ "$DRY_RUN" == 1 ]]; then
  echo "+ $(quote mkdir -p "$LOG_DIR")"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    build_command "$i" "$@"
    echo "+ $(quote "${CMD[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1 &"
  done
  ((FOLLOW)) && echo "+ $(quote tail -n +1 -F "$LOG_DIR/process_0.log") &"
  echo "+ wait (timeout ${TIMEOUT}s; if one process fails, stop the others)"
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
TAIL_PID=""

# Stops every process still running (its whole process group when it has one), politely first.
stop_all() {
  local pid target alive=()
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      alive+=("$pid")
      target="$pid"
      [[ ${#SETSID[@]} -gt 0 ]] && target="-$pid"
      kill -TERM -- "$target" 2>/dev/null || true
    fi
  done
  for _ in $(seq 50); do  # up to 5 s for a clean exit
    local any=0
    for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    ((any)) || break
    sleep 0.1
  done
  for pid in "${alive[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      target="$pid"
      [[ ${#SETSID[@]} -gt 0 ]] && target="-$pid"
      kill -KILL -- "$target" 2>/dev/null || true
    fi
  done
  if [[ -n "$TAIL_PID" ]]; then
    sleep 0.5  # let it print the last lines
    kill "$TAIL_PID" 2>/dev/null || true
  fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

echo "local_multiprocess.sh: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices," \
  "coordinator $ADDRESS, logs in $LOG_DIR" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i" "$@"
  echo "+ $(quote "${CMD[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1 &" >&2
  "${CMD[@]}" >"$LOG_DIR/process_$i.log" 2>&1 </dev/null &
  PIDS+=("$!")
done
if ((FOLLOW)); then
  tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null &
  TAIL_PID=$!
fi

# Milliseconds on a monotonic-enough clock (bash 5's EPOCHREALTIME; else whole seconds, rounded
# up so the timeout is never cut short).
now_ms() {
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    local t="${EPOCHREALTIME//[!0-9]/}"
    echo $((10#$t / 1000))
  else
    echo $(((SECONDS + 1) * 1000))
  fi
}

declare -A STATUS=()
deadline=$(($(now_ms) + TIMEOUT * 1000))
failed=""
rc=0
while ((${#STATUS[@]} < NUM_PROCESSES)); do
  for i in "${!PIDS[@]}"; do
    [[ -n "${STATUS[$i]:-}" ]] && continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    status=0
    wait "${PIDS[$i]}" || status=$?
    STATUS[$i]=$status
    if ((status != 0)) && [[ -z "$failed" ]]; then
      failed=$i
      rc=$status
    fi
  done
  if [[ -n "$failed" ]]; then
    echo "local_multiprocess.sh: process $failed exited with status $rc; stopping the others" >&2
    break
  fi
  if (($(now_ms) >= deadline)); then
    echo "local_multiprocess.sh: timeout after ${TIMEOUT}s; stopping all processes" >&2
    rc=124
    break
  fi
  ((${#STATUS[@]} < NUM_PROCESSES)) && sleep 0.2
done
stop_all
trap - INT TERM
for i in "${!PIDS[@]}"; do
  if [[ -z "${STATUS[$i]:-}" ]]; then
    wait "${PIDS[$i]}" 2>/dev/null || true
    STATUS[$i]="stopped"
  fi
  echo "  process $i: ${STATUS[$i]}  $LOG_DIR/process_$i.log" >&2
done
if [[ -n "$failed" ]]; then
  echo "--- last lines of process $failed's log ---" >&2
  tail -n 30 "$LOG_DIR/process_$failed.log" >&2 || true
fi
exit "$rc"
