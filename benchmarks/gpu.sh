#!/usr/bin/env bash
# Everything BENCHMARKS.md wants from a lent GPU, in one run of at most ~8 minutes:
#   1. the PyTorch peer (benchmarks/torch_mae.py: the same MAE, bf16 autocast, SDPA), if the
#      image has torch with CUDA, B/16 and L/16 at the timed batches (at most 90 s);
#   2. benchmarks/gpu.py (its docstring says what): B/16 and L/16 with cuDNN attention at the
#      timed batch and at the largest batch, a profiler trace and its text breakdown of each,
#      the compilation cache's cold and warm start, a sweep of XLA options; it skips what
#      would end after the deadline, so the run ends by ~7.7 minutes from the start.
# What it prints goes to $OUT/gpu.log too; traces to $OUT/traces/, the peer to $OUT/torch.json.
#   OUT=/tmp/gpu_out bash benchmarks/gpu.sh | tail        # on the device, from the repo root
#   bash benchmarks/gpu.sh --smoke                        # tiny models on any device, ~1 minute
# The device's image (2026-11-30: JAX 0.11.2 with CUDA 13, flax, optax, orbax; Python 3.12)
# lacks grain, tensorflow-datasets, ml-collections, simplejpeg and a few of their needs:
# `bash benchmarks/gpu_wheels.sh` downloads them here into .whl/ (~30 MB; carry it to the
# device with the run), and this script installs them (--no-deps) when an import is missing.
# mae_jax itself is imported from this checkout (PYTHONPATH), not installed. With the device
# tool: bash benchmarks/gpu_wheels.sh here, then run `bash benchmarks/gpu.sh` there with
# carry [".whl"] and a timeout of ~540 s ($OUT is the tool's; everything comes back in it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The largest batch is sized against the memory JAX does not preallocate by default (75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
start=$SECONDS
date -u
missing() {
  python -c "import importlib.util as u; print(' '.join(m for m in ('grain', 'tensorflow_datasets',
    'ml_collections', 'simplejpeg', 'skimage', 'tensorboardX', 'flax', 'optax', 'orbax.checkpoint')
    if u.find_spec(m.split('.')[0]) is None))"
}
if [[ -n "$(missing)" && -d .whl ]]; then
  echo "installing .whl/ for: $(missing)"
  pip install -q --no-deps .whl/*.whl
fi
if [[ -n "$(missing)" ]]; then
  echo "missing Python packages: $(missing) (bash benchmarks/gpu_wheels.sh makes .whl/)"
  exit 1
fi
smoke=0
[[ " $* " == *" --smoke "* ]] && smoke=1
if [[ $smoke == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu' and
             'no GPU visible to JAX: pip install \"jax[cuda13]\"')"
  if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    timeout 90 python benchmarks/torch_mae.py --json "$OUT/torch.json" ||
      echo "PyTorch peer: failed or cut at 90 s"
  else
    echo "no torch with CUDA in this image: no PyTorch peer"
  fi
else
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0  # tiny steps compile in under 1 s
fi
left=$((460 - (SECONDS - start)))
timeout "$left" python benchmarks/gpu.py --out "$OUT" --peer "$OUT/torch.json" \
  --deadline_s $((left - 30)) "$@"
date -u
