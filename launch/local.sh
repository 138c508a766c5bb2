#!/usr/bin/env bash
# Pretrain on this machine: one process on all local devices (CPU, GPUs or TPU chips),
# or several CPU processes on localhost to rehearse a multi-host run.
#
#   launch/local.sh WORKDIR [main.py flags...]          # e.g. --config=configs/demo.py
#   NUM_PROCESSES=2 FAKE_DEVICES=4 launch/local.sh WORKDIR --config=configs/demo.py
#
# FAKE_DEVICES splits the CPU into that many devices per process (to try sharding code).
set -euo pipefail
workdir=${1:?WORKDIR}; shift
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
pids=()
for ((i = 0; i < n; i++)); do
  python -m mae_jax.main --workdir="$workdir" --coordinator_address="localhost:$port" \
    --num_processes="$n" --process_id="$i" --cpu_collectives=gloo "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
