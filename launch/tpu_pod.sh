#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: the same command runs on every worker (--worker=all).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE            # copy this checkout, install on all workers
#   launch/tpu_pod.sh run   TPU_NAME ZONE WORKDIR [main.py flags...]
#
# WORKDIR must be one location every worker sees: a Cloud Storage bucket path (gs://...,
# written directly, with the VM's service account) or a shared directory (e.g. Filestore).
# Orbax writes one checkpoint from all hosts. Examples:
#   launch/tpu_pod.sh run my-v4-64 us-central2-b gs://my-bucket/runs/mae_b16 \
#     --config=configs/base.py:variant=B/16 --config.input.data_dir=gs://my-bucket/tfds
#   launch/tpu_pod.sh run my-v4-64 us-central2-b /mnt/filestore/mae_b16 \
#     --config=configs/base.py:variant=B/16 --config.input.data_dir=/mnt/filestore/tfds
set -euo pipefail
action=${1:?setup or run}; tpu=${2:?TPU name}; zone=${3:?zone}; shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }

case "$action" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo" "$tpu":~/mae_jax
    ssh_all 'cd ~/mae_jax && python3 -m pip install -U "jax[tpu]" && python3 -m pip install -e ".[gcs]"'
    ;;
  run)
    workdir=${1:?WORKDIR}; shift
    [[ $# -gt 0 ]] || set -- --config=configs/base.py
    flags=$(printf ' %q' "$@")
    # --jax_distributed: jax.distributed.initialize() finds the TPU workers by itself.
    ssh_all "cd ~/mae_jax && python3 -m mae_jax.main --jax_distributed --workdir=$workdir$flags 2>&1 | tee -a ~/mae_jax_\$(hostname).log"
    ;;
  *) echo "unknown action $action (setup or run)" >&2; exit 2 ;;
esac
