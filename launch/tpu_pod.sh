#!/usr/bin/env bash
# Pretrain on Cloud TPU: one slice (a TPU VM) or several (a queued resource of N nodes), the
# same command on every worker; the job runs detached, so it outlives this shell and its SSH.
#
#   launch/tpu_pod.sh create NAME ZONE TYPE RUNTIME [gcloud flags]  # queued resource, e.g. --spot
#   launch/tpu_pod.sh setup  NAME ZONE                    # copy this checkout, install the pins
#   launch/tpu_pod.sh run    NAME ZONE WORKDIR [main.py flags...]   # start the job, return
#   launch/tpu_pod.sh status NAME ZONE                    # each worker: running or not, its step
#   launch/tpu_pod.sh logs   NAME ZONE [[SLICE:]WORKER [LINES]]     # the end of a worker's log
#   launch/tpu_pod.sh stop   NAME ZONE                    # SIGTERM: every worker saves and exits
#   launch/tpu_pod.sh watch  NAME ZONE WORKDIR [main.py flags...]   # keep the run going (spot)
#
# SLICES=N (any action): the job spans the N slices NAME-0 ... NAME-(N-1) that
# `SLICES=N launch/tpu_pod.sh create NAME ...` requests (--node-count=N --node-prefix=NAME).
#
# WORKDIR must be one location every worker sees: a Cloud Storage path (gs://...) or a shared
# directory (e.g. Filestore); a run in it resumes from its newest checkpoint. Each worker logs to
# ~/mae_jax_job/log (launch/tpu_worker.sh, the worker's side, keeps the job's files there).
set -euo pipefail
action=${1:?create, setup, run, status, logs, stop or watch}
name=${2:?TPU name}; zone=${3:?zone}; shift 3
slices=${SLICES:-1}
repo=$(cd "$(dirname "$0")/.." && pwd)
records="${XDG_STATE_HOME:-$HOME/.local/state}/mae_jax_tpu"  # `create` commands, for `watch`

fail() { echo "error: $1" >&2; exit 1; }
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || fail "SLICES=$slices: give a number of slices, 1 or more"

node() { if ((slices > 1)); then echo "$name-$1"; else echo "$name"; fi; }

# Runs a command on every worker of every slice at once (in ~/mae_jax, unless it changes
# directory); fails if it fails anywhere. Multi-slice commands learn their slice from SLICE_ID.
on_workers() {
  local pids=() i rc=0
  for ((i = 0; i < slices; i++)); do
    local env=""
    if ((slices > 1)); then
      env="export SLICE_ID=$i NUM_SLICES=$slices"
      env+="${slice_coordinator:+ SLICE_COORDINATOR=$slice_coordinator}; "
    fi
    gcloud compute tpus tpu-vm ssh "$(node "$i")" --zone="$zone" --worker=all \
      --command="cd ~/mae_jax 2>/dev/null; $env$1" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  return "$rc"
}

worker_status() {
  on_workers 'if [ -x launch/tpu_worker.sh ]; then launch/tpu_worker.sh status; else
              echo "$(hostname): not set up (launch/tpu_pod.sh setup)"; fi'
}

require_idle() {  # never start a second job next to one that runs, or swap its code
  local busy
  busy=$(worker_status | grep ': running' || true)
  [[ -z "$busy" ]] || fail "a job is running ($(echo "$busy" | head -n 1)); stop it first"
}

setup() {
  require_idle
  local tmp tarball
  tmp=$(mktemp -d); tarball="$tmp/mae_jax.tar.gz"
  # The checkout as it is: tracked and new files, not what .gitignore leaves out (GNU and BSD
  # tar alike, for a Mac as for Linux).
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    (cd "$repo" && while IFS= read -r -d '' f; do [[ ! -e "$f" ]] || printf '%s\0' "$f"; done) |
    tar -C "$repo" --null -T - -czf "$tarball"
  local pids=() i rc=0
  for ((i = 0; i < slices; i++)); do
    gcloud compute tpus tpu-vm scp --zone="$zone" --worker=all "$tarball" \
      "$(node "$i")":mae_jax.tar.gz &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  rm -rf "$tmp"
  ((rc == 0)) || fail "copying the checkout to the workers failed"
  on_workers 'cd ~ && rm -rf mae_jax && mkdir mae_jax && tar -xzf mae_jax.tar.gz -C mae_jax &&
              rm mae_jax.tar.gz && mae_jax/launch/tpu_worker.sh install'
}

check_workdir() {
  [[ "$1" == gs://* || "$1" == /* ]] ||
    fail "WORKDIR $1: give a gs:// path or an absolute path every worker sees"
}

run() {
  local workdir=${1:?WORKDIR}; shift
  check_workdir "$workdir"
  [[ $# -gt 0 ]] || set -- --config=configs/base.py
  require_idle
  if ((slices > 1)); then  # the first worker of the first slice coordinates the slices
    slice_coordinator=$(gcloud compute tpus tpu-vm describe "$(node 0)" --zone="$zone" \
                        --format='value(networkEndpoints[0].ipAddress)')
  fi
  on_workers "launch/tpu_worker.sh start $(printf '%q ' "$workdir" "$@")"
}

create() {
  local type=${1:?accelerator type, e.g. v5p-128}; local runtime=${2:?runtime version}; shift 2
  local nodes=(--node-id="$name")
  ((slices == 1)) || nodes=(--node-count="$slices" --node-prefix="$name")
  local cmd=(gcloud compute tpus queued-resources create "$name" --zone="$zone"
             --accelerator-type="$type" --runtime-version="$runtime" "${nodes[@]}" "$@")
  mkdir -p "$records"
  printf '%q ' "${cmd[@]}" > "$records/$name"  # what `watch` runs again after a reclaim
  "${cmd[@]}"
}

queued_state() {  # the queued resource's state; empty when there is none
  gcloud compute tpus queued-resources describe "$name" --zone="$zone" \
    --format='value(state.state)' 2>/dev/null || true
}

# Keeps WORKDIR's run going until it finishes or is stopped: a reclaimed (spot) queued resource
# is deleted and requested again, fresh workers are set up, and a job that is down on any
# worker is restarted on all of them; it resumes from the newest checkpoint in WORKDIR.
watch() {
  local interval=${WATCH_INTERVAL:-300} states
  check_workdir "${1:?WORKDIR}"
  while true; do
    case "$(queued_state)" in
      SUSPENDED|FAILED)
        [[ -f "$records/$name" ]] || fail "$name was not requested by '$0 create': cannot renew it"
        echo "$(date -u '+%F %T') $name was reclaimed: requesting it again"
        gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet &&
          eval "$(cat "$records/$name")" || echo "renewing $name failed; trying again later" ;;
      ""|ACTIVE)
        if ! states=$(worker_status); then
          echo "$(date -u '+%F %T') some workers do not answer; trying again later"
        elif ! grep -vq ': finished' <<< "$states"; then
          echo "$states"; echo "finished"; return
        elif grep -q ': stopped' <<< "$states"; then
          echo "$states"; echo "stopped by hand"; return
        elif grep -vq ': running' <<< "$states"; then
          echo "$(date -u '+%F %T') restarting:"; echo "$states"
          # In a subshell: a refusal (exit) or a failure waits for the next look.
          ( if grep -q 'not set up' <<< "$states"; then setup; fi &&
            on_workers 'launch/tpu_worker.sh stop' && run "$@" ) ||
            echo "restarting failed; trying again later"
        fi ;;
    esac
    sleep "$interval"
  done
}

case "$action" in
  create) create "$@" ;;
  setup) setup ;;
  run) run "$@" ;;
  status) worker_status ;;
  logs)
    where=${1:-0}; slice=0
    [[ "$where" != *:* ]] || { slice=${where%%:*}; where=${where#*:}; }
    env=$( ((slices == 1)) || echo "export SLICE_ID=$slice; ")
    gcloud compute tpus tpu-vm ssh "$(node "$slice")" --zone="$zone" --worker="$where" \
      --command="${env}~/mae_jax/launch/tpu_worker.sh logs ${2:-100}" ;;
  stop) on_workers 'launch/tpu_worker.sh stop' ;;
  watch) watch "$@" ;;
  *) fail "unknown action $action (create, setup, run, status, logs, stop or watch)" ;;
esac
