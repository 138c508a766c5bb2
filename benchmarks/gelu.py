"""Exact GELU on CPU: jax.nn.gelu (erfc form) vs the erf form mae_jax uses vs tanh.

  python benchmarks/gelu.py [--rows 12544] [--cols 3072] [--repeats 20]

Times forward + backward of each form on one [rows, cols] float32 array (default: the MLP
activations of 64 ViT-B/16 images with 196 tokens), interleaved round by round so machine
drift hits all forms alike, and prints the median time of each relative to the erf form,
plus the largest deviation from float64 GELU.
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from mae_jax.models import gelu as gelu_erf

FORMS = {
    "mae_jax gelu (erf form)": gelu_erf,
    "jax.nn.gelu exact (erfc form)": lambda x: jax.nn.gelu(x, approximate=False),
    "jax.nn.gelu tanh (not faithful)": lambda x: jax.nn.gelu(x, approximate=True),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=64 * 196)
  parser.add_argument("--cols", type=int, default=3072)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.rows, args.cols)) * 2
  exact = np.asarray(x, np.float64) * 0.5 * special.erfc(-np.asarray(x, np.float64) / math.sqrt(2))
  fns = {name: jax.jit(jax.value_and_grad(lambda x, f=f: f(x).sum())) for name, f in FORMS.items()}
  times = {name: [] for name in fns}
  for fn in fns.values():
    jax.block_until_ready(fn(x))
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[name].append(time.perf_counter() - start)
  base = np.median(times["mae_jax gelu (erf form)"])
  print(f"{jax.devices()[0].device_kind}, x: {x.shape} float32, forward + backward")
  for name, f in FORMS.items():
    err = np.abs(np.asarray(jax.jit(f)(x), np.float64) - exact).max()
    print(f"{name:34s} {np.median(times[name]) * 1e3:8.2f} ms  x{np.median(times[name]) / base:5.2f}"
          f"  max |err| vs float64: {err:.1e}")


if __name__ == "__main__":
  main()
