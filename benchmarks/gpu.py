"""The bfloat16 pretraining step on one accelerator: images/s, MFU, largest batch, attention.

  python benchmarks/gpu.py [--variants B/16,L/16] [--batches 256,128] [--smoke]
  (benchmarks/gpu.sh runs it with the settings its figures in BENCHMARKS.md use)

For each variant (the paper's decoder, mask 0.75, norm_pix_loss, bfloat16 matmuls), the
trainer's own step (`make_train_step` with the recipe's AdamW, built by mae_step.jax_step) is
timed with `jax.nn.dot_product_attention` as shipped (implementation=None: JAX picks), forced
to 'xla', and forced to 'cudnn' (fused flash attention), rows round-robin, median of
--repeats. MFU is model FLOPs per second (metrics.train_flops_per_image) over the rate of a
large bfloat16 matmul timed in the same run (and over the chip's spec peak when known). Then
the largest batch whose step runs, doubling and bisecting, each variant for at most
--search_seconds. --smoke: a tiny model on whatever device there is, a few seconds (CI).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import sys
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mae_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from mae_jax import metrics, model_config  # pylint: disable=g-import-not-at-top
from mae_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

SMOKE = dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, decoder_width=32,
             decoder_depth=1, decoder_num_heads=2)


@contextlib.contextmanager
def attention(implementation: str | None) -> Iterator[None]:
  """Traces the model's `jax.nn.dot_product_attention` calls with this implementation."""
  shipped = jax.nn.dot_product_attention
  jax.nn.dot_product_attention = functools.partial(shipped, implementation=implementation)
  try:
    yield
  finally:
    jax.nn.dot_product_attention = shipped


def build_step(config: ModelConfig, batch: int,
               implementation: str | None) -> Callable[[], None]:
  """The compiled train step (run once) as a closure; raises if it cannot run."""
  with attention(implementation):
    return mae_step.jax_step(config, batch)


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def matmul_flops_per_s(n: int, repeats: int) -> float:
  """FLOP/s of an [n, n] @ [n, n] bfloat16 matmul (float32 accumulation), median."""
  run, flops = mae_step.matmul(n, jnp.bfloat16)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return flops / np.median(times)


def largest_batch(config: ModelConfig, start: int, seconds: float,
                  resolution: int) -> tuple[int, int | None, bool]:
  """(largest batch that ran, smallest that did not or None, whether the time cap hit).

  Doubles from `start` until a step does not fit, then bisects down to `resolution`.
  """
  deadline = time.perf_counter() + seconds
  fits, fails = 0, None
  batch = start
  while True:
    try:
      run = build_step(config, batch, None)
      run()
      del run
      fits = batch
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      fails = batch
    gc.collect()
    if fails is not None and fails - fits <= resolution:
      return fits, fails, False
    if time.perf_counter() > deadline:
      return fits, fails, True
    if fails is None:
      batch *= 2
    else:
      batch = max(resolution, (fits + fails) // 2 // resolution * resolution)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="B/16,L/16")
  parser.add_argument("--batches", default="256,128", help="timed batch per variant")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  parser.add_argument("--search_seconds", type=float, default=90)
  parser.add_argument("--matmul", type=int, default=8192)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
  args = parser.parse_args()
  variants = args.variants.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  overrides = {}
  if args.smoke:
    batches, overrides = [4] * len(variants), SMOKE
    args.repeats, args.steps, args.search_seconds, args.matmul = 1, 1, 0, 256
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}"
        f"{' (smoke: tiny models)' if args.smoke else ''}", flush=True)
  matmul = matmul_flops_per_s(args.matmul, max(args.repeats, 3))
  peak = metrics.peak_flops(device.device_kind)
  print(f"bfloat16 matmul {args.matmul}^3: {matmul / 1e12:.1f} TFLOP/s"
        + (f" ({matmul / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s spec)" if peak else ""),
        flush=True)

  rows, configs = {}, {}
  for variant, batch in zip(variants, batches):
    configs[variant] = model_config(variant, dtype="bfloat16", **overrides)
    for implementation in (None, "xla", "cudnn"):
      name = f"{variant} batch {batch}, attention {implementation or 'as shipped (JAX picks)'}"
      try:
        rows[name] = (variant, batch, build_step(configs[variant], batch, implementation))
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {name}: does not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
              flush=True)
  times = {name: [] for name in rows}
  for _ in range(args.repeats):
    for name, (_, _, run) in rows.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        run()
      times[name].append((time.perf_counter() - start) / args.steps)
  print(f"step time, median of {args.repeats} x {args.steps} steps:")
  for name, (variant, batch, _) in rows.items():
    step_time = np.median(times[name])
    flops = metrics.train_flops_per_image(configs[variant]) * batch / step_time
    spec = f", {flops / peak:.1%} of spec" if peak else ""
    print(f"  {name:52s} {step_time * 1e3:8.1f} ms  {batch / step_time:9.1f} images/s  "
          f"MFU {flops / matmul:.1%} of the measured matmul rate{spec}", flush=True)
  rows.clear()
  gc.collect()
  for variant, batch in zip(variants, batches):
    fits, fails, capped = largest_batch(configs[variant], batch, args.search_seconds,
                                        max(1, batch // 16))
    print(f"  {variant} largest batch that runs: {fits}"
          + (f" ({fails} does not fit)" if fails else " (none failed)")
          + (f" [stopped at the {args.search_seconds:.0f} s cap]" if capped else ""),
          flush=True)


if __name__ == "__main__":
  main()
