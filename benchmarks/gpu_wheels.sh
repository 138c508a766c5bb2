#!/usr/bin/env bash
# Downloads into .whl/ the Python 3.12 wheels that benchmarks/gpu.sh installs on a device
# whose image has JAX (CUDA), flax, optax and orbax but not the rest of mae_jax's run-time
# needs (grain, tensorflow-datasets, ml-collections, simplejpeg, scikit-image for the demo
# data, tensorboardX and the pure-Python packages they import). ~30 MB, under the 64 MiB a
# device call carries; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
pip download -q --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  grain array_record cloudpickle tensorflow-datasets tensorflow-metadata immutabledict toml \
  ml_collections simplejpeg scikit-image lazy_loader imageio tifffile networkx pillow \
  tensorboardX safetensors wrapt tqdm portpicker
du -sh .whl
