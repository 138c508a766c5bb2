#!/usr/bin/env bash
# One TPU worker's side of launch/tpu_pod.sh, which runs it on every worker (gcloud ... ssh
# --worker=all) from the checkout that `tpu_pod.sh setup` copied to ~/mae_jax.
#
#   launch/tpu_worker.sh install                          # this checkout, at the pinned versions
#   launch/tpu_worker.sh start WORKDIR [main.py flags...] # the job, detached; returns at once
#   launch/tpu_worker.sh status                           # one line: the job's state, last step
#   launch/tpu_worker.sh logs [LINES]                     # the end of the job's log
#   launch/tpu_worker.sh stop [TIMEOUT_S]                 # SIGTERM (save, as on preemption), wait
#
# The job's files on this worker, in ~/mae_jax_job: log (every start appends to it), pid,
# exit (the last run's exit code, written when it ends) and stopped (written by stop).
set -euo pipefail
cd "$(dirname "$0")/.."
job="$HOME/mae_jax_job"
metadata_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes

metadata() { curl -sf --max-time 2 -H 'Metadata-Flavor: Google' "$metadata_url/$1" 2>/dev/null; }

label() {  # "worker 3", or "slice 1 worker 3" on a multi-slice job
  local worker=${TPU_WORKER_ID:-$(metadata agent-worker-number || hostname)}
  echo "${SLICE_ID:+slice $SLICE_ID }worker $worker"
}

running() {
  [[ -f "$job/pid" && ! -f "$job/exit" ]] && kill -0 "$(cat "$job/pid")" 2>/dev/null
}

this_run() { awk '/^=== /{n = NR} {line[NR] = $0} END {for (i = n; i <= NR; i++) print line[i]}' \
  "$job/log"; }  # the log since the last start

last_step() {  # "step 40/200", from the progress lines, a resume or a preemption save
  local step
  step=$(grep -oE 'step [0-9]+/[0-9]+|(resumed from|saved) step [0-9]+' "$job/log" 2>/dev/null |
         tail -n 1 | grep -oE '[0-9]+(/[0-9]+)?') || true
  echo "step ${step:-none yet}"
}

state() {
  if [[ ! -f "$job/log" ]]; then echo "no job"
  elif running; then echo "running (pid $(cat "$job/pid"))"
  elif [[ ! -f "$job/exit" ]]; then echo "gone (ended without an exit code: the VM restarted?)"
  elif [[ -f "$job/stopped" ]]; then echo "stopped"
  elif [[ "$(cat "$job/exit")" != 0 ]]; then echo "failed (exit $(cat "$job/exit"))"
  elif this_run | grep -q 'preempted (SIGTERM)'; then echo "preempted"
  else echo "finished"
  fi
}

start() {
  local workdir=${1:?WORKDIR}; shift
  if running; then echo "$(label): a job is already running (pid $(cat "$job/pid"))" >&2; exit 1; fi
  mkdir -p "$job"
  rm -f "$job/pid" "$job/exit" "$job/stopped"
  # Multi-slice: JAX and libtpu find the other slices through MEGASCALE_*. A queued resource
  # puts them in each VM's tpu-env metadata; otherwise they come from tpu_pod.sh.
  if [[ -n "${SLICE_ID:-}" && -z "${MEGASCALE_NUM_SLICES:-}" ]] &&
     ! metadata tpu-env | grep -q '^MEGASCALE_NUM_SLICES'; then
    export MEGASCALE_COORDINATOR_ADDRESS=${SLICE_COORDINATOR:?}:8080 MEGASCALE_PORT=8080 \
           MEGASCALE_NUM_SLICES=${NUM_SLICES:?} MEGASCALE_SLICE_ID=$SLICE_ID
  fi
  # jax.distributed.initialize() finds the TPU workers by itself. Where it cannot, give the
  # layout: JAX_COORDINATOR_ADDRESS (read by JAX), JAX_PROCESS_COUNT and JAX_PROCESS_ID.
  local cmd=(python3 -m mae_jax.main --jax_distributed --workdir="$workdir")
  if [[ -n "${JAX_PROCESS_ID:-}" ]]; then
    cmd+=(--num_processes="${JAX_PROCESS_COUNT:?}" --process_id="$JAX_PROCESS_ID")
  fi
  cmd+=("$@")
  echo "=== $(date -u '+%F %T') UTC $(label): ${cmd[*]}" >> "$job/log"
  # A new session (setsid) with no terminal: the job outlives the SSH connection.
  setsid nohup bash -c '"${@:2}" < /dev/null >> "$1/log" 2>&1 & echo $! > "$1/pid"
                        wait $!; echo $? > "$1/exit"' _ "$job" "${cmd[@]}" \
    < /dev/null > /dev/null 2>&1 &
  for _ in {1..100}; do [[ -s "$job/pid" ]] && break; sleep 0.1; done
  if [[ ! -s "$job/pid" ]]; then
    echo "$(label): the job did not start (see ~/mae_jax_job/log)" >&2; exit 1
  fi
  echo "$(label): started (pid $(cat "$job/pid")), log ~/mae_jax_job/log"
}

stop() {  # a job that has not exited TIMEOUT_S after SIGTERM (peers gone, a hang) is killed
  local timeout=${1:-1200} waited=0
  if ! running; then echo "$(label): $(state), $(last_step)"; return; fi
  touch "$job/stopped"
  kill -TERM "$(cat "$job/pid")"
  while running; do
    if ((waited++ >= timeout)); then
      echo "$(label): still running ${timeout}s after SIGTERM: killing it" >&2
      kill -KILL "$(cat "$job/pid")"
    fi
    sleep 1
  done
  echo "$(label): stopped (exit $(cat "$job/exit")), $(last_step)"
}

action=${1:?install, start, status, logs or stop}; shift
case "$action" in
  install) python3 -m pip install --quiet -c constraints.txt -e ".[tpu,gcs]" ;;
  start) start "$@" ;;
  status) echo "$(label): $(state), $(last_step)" ;;
  logs) echo "== $(label)"; tail -n "${1:-100}" "$job/log" 2>/dev/null || echo "(no log yet)" ;;
  stop) stop "$@" ;;
  *) echo "unknown action $action (install, start, status, logs or stop)" >&2; exit 2 ;;
esac
