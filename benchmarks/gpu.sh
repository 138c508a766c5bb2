#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md in one go, under 8 minutes on one GPU (H200):
# ViT-B/16 and ViT-L/16 bfloat16 pretraining step images/s and MFU, cuDNN fused attention on
# and off, the largest batch that runs (benchmarks/gpu.py says how).
#   pip install -e . "jax[cuda12]" && bash benchmarks/gpu.sh | tee gpu.log
#   bash benchmarks/gpu.sh --smoke     # tiny models on any device, a few seconds
set -euo pipefail
cd "$(dirname "$0")/.."
# The largest-batch search needs the memory JAX does not preallocate by default (75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
if [[ " $* " != *" --smoke "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu' and
             'no GPU visible to JAX: pip install \"jax[cuda12]\"')"
fi
date -u
exec timeout 470 python benchmarks/gpu.py "$@"
