#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md in one go on one GPU: ViT-B/16 and ViT-L/16
# bfloat16 pretraining step images/s and MFU with cuDNN's and XLA's attention, and each
# variant's largest batch from XLA's memory analysis (benchmarks/gpu.py says how). Each step
# takes about a minute to compile on an H200, so a run should take about 6.5 minutes; the
# timeout below ends it at 470 s, keeping what it has printed. Arguments go to gpu.py.
#   pip install -e . "jax[cuda13]" && bash benchmarks/gpu.sh | tee gpu.log
#   bash benchmarks/gpu.sh --smoke     # tiny models on any device, about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
# The largest batch is sized against the memory JAX does not preallocate by default (75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
if [[ " $* " != *" --smoke "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu' and
             'no GPU visible to JAX: pip install \"jax[cuda13]\"')"
fi
date -u
exec timeout 470 python benchmarks/gpu.py "$@"
