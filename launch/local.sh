#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine's CPU, the way a pod or a cluster runs it on N
# hosts: for developing and testing multi-process code without a cluster.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [--processes=N] [--devices_per_process=K] [--port=PORT] -- COMMAND [ARG...]

Starts N copies of COMMAND on this machine's CPU as one multi-process JAX run. Each copy gets
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I
appended (the flags of lm.distributed, which lm.train, lm.evaluate and lm.generate read), and
JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K in its environment, so the run has
N*K devices over N processes, as N hosts of K accelerators would. Output lines are prefixed with [I].
Waits for every process; when one fails, stops the others and exits with its status.

Options:
  --processes=N            number of processes (default 2)
  --devices_per_process=K  CPU devices per process (default 1)
  --port=PORT              coordinator port on 127.0.0.1 (default: a free one)
  -h, --help               show this help

Example:
  launch/local.sh --processes=2 --devices_per_process=4 -- \
      python -m lm.train --config=configs/tiny.py --workdir=workdirs/mp
EOF
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 403)) || die "needs bash 4.3 or newer (for wait -n)"

processes=2
devices_per_process=1
port=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --processes=*) processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "no command given (see --help)"
for value in "$processes" "$devices_per_process" ${port:+"$port"}; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$value'"
done
if [[ -z "$port" ]]; then
  # The kernel's choice of a free port; it stays free in the moment before process 0 binds it.
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

# Job control gives each process (with its output prefixer) its own process group, so stop_all ends the whole of it.
set -m
for ((i = 0; i < processes; i++)); do
  (
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process" \
      PYTHONUNBUFFERED=1 "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$processes" \
      --process_id="$i" 2>&1 |
      while IFS= read -r line || [[ -n "$line" ]]; do printf '[%d] %s\n' "$i" "$line"; done
  ) &
  pids+=("$!")
done
set +m

for ((finished = 0; finished < processes; finished++)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    echo "local.sh: a process exited with status $status; stopping the others" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
