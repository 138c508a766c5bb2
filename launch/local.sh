#!/usr/bin/env bash
# Pretrain on this machine: one process on all local devices (CPU, GPUs or TPU chips),
# or several CPU processes on localhost to rehearse a multi-host run.
#
#   launch/local.sh WORKDIR [main.py flags...]          # e.g. --config=configs/demo.py
#   NUM_PROCESSES=2 FAKE_DEVICES=4 launch/local.sh WORKDIR --config=configs/demo.py
#
# FAKE_DEVICES splits the CPU into that many devices per process (to try sharding code).
# With several processes, the console shows process 0; the others log to a temporary folder.
set -euo pipefail
workdir=${1:?WORKDIR}; shift
[[ "$workdir" == /* || "$workdir" == gs://* ]] || workdir="$PWD/$workdir"  # relative to the caller
[[ $# -gt 0 ]] || set -- --config=configs/demo.py
cd "$(dirname "$0")/.."
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$FAKE_DEVICES"
fi
n=${NUM_PROCESSES:-1}
if [[ "$n" == 1 ]]; then
  exec python -m mae_jax.main --workdir="$workdir" "$@"
fi
export JAX_PLATFORMS=cpu
port=$(python -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
# Process 0 on the console, without the collectives' connection chatter ("[Gloo] Rank 0 is
# connected to ..."); the others into log files.
logs=$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_local.XXXXXX")
echo "processes 1-$((n - 1)) log to $logs" >&2
pids=()
# Job control while starting them: each process in its own process group, where SIGINT keeps
# its default (without it a script starts background processes with SIGINT ignored). A Ctrl-C
# reaches this script alone, which passes it to every process: all save at one step and stop.
# (Off again afterwards: it would print a line as each process ends.)
set -m
for ((i = 0; i < n; i++)); do
  cmd=(python -m mae_jax.main --workdir="$workdir" --coordinator_address="localhost:$port"
       --num_processes="$n" --process_id="$i" --cpu_collectives=gloo "$@")
  if ((i == 0)); then
    "${cmd[@]}" > >(trap '' INT; exec grep -v --line-buffered '^\[Gloo\]') &
  else
    "${cmd[@]}" > "$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
set +m
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT
status=0
for ((i = 0; i < n; i++)); do
  # A trapped signal ends `wait` early (with 128 + its number): wait again while it runs.
  while wait "${pids[$i]}"; code=$?; ((code > 128)) && kill -0 "${pids[$i]}" 2>/dev/null; do :; done
  ((code == 0)) && continue
  ((status)) || status=$code
  ((i == 0 || code == 130)) || echo "process $i failed (exit $code); its log: $logs/process_$i.log" >&2
done
exit $status
