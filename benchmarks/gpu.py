"""The bfloat16 pretraining step on one accelerator: images/s, MFU, largest batch, attention.

  python benchmarks/gpu.py [--variants B/16,L/16] [--batches 256,128] [--attention xla,cudnn]
      [--no_max_batch] [--confirm] [--smoke]
  (benchmarks/gpu.sh runs it with the settings its figures in BENCHMARKS.md use)

First, cuDNN's fused attention against XLA's on the model's two attention shapes (encoder
and decoder, forward and gradients): relative error. Then for each variant (the paper's
decoder, mask 0.75, norm_pix_loss, bfloat16 matmuls), the trainer's own step
(`make_train_step` with the recipe's AdamW, built by mae_step.build) is timed with the
model's `attention` set to each of --attention, rows round-robin, median of --repeats.
'auto', the default, is 'cudnn' on NVIDIA GPUs from Ampere on in bfloat16. MFU is model FLOPs per second
(metrics.train_flops_per_image) over the rate of a large bfloat16 matmul timed in the same
run (and over the chip's spec peak when known).

Largest batch, with the default attention: the step compiled once at 4x the timed batch
(XLA's autotuning off: it changes kernels, not buffers) gives its device memory; the train
state and the program do not grow with the batch, the rest grows linearly, and the batch
where that reaches the allocator's limit is printed (--confirm compiles and runs it: a
full-size compile takes about a minute on an H200). --smoke: tiny models on whatever
device there is, about a minute.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mae_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from mae_jax import metrics, model_config, models  # pylint: disable=g-import-not-at-top
from mae_jax.aot import live_bytes  # pylint: disable=g-import-not-at-top
from mae_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

SMOKE = dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, decoder_width=32,
             decoder_depth=1, decoder_num_heads=2)
GiB = 1 << 30


def attention_error(shape: tuple[int, int, int, int]) -> tuple[float, float]:
  """Relative error of cuDNN's attention (as the model calls it, `models.attend_even`)
  against XLA's on random bfloat16 [B, N, H, Dh] inputs: (output, gradients of q, k, v)."""
  q, k, v, t = (jax.random.normal(key, shape, jnp.bfloat16)
                for key in jax.random.split(jax.random.key(0), 4))

  def loss_and_grads(implementation):
    def f(q, k, v):
      out = models.attend_even(q, k, v, implementation)
      return jnp.sum(out.astype(jnp.float32) * t.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads

  (out, grads), (ref, ref_grads) = loss_and_grads("cudnn"), loss_and_grads("xla")
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) /
                           jnp.linalg.norm(b.astype(jnp.float32)))
  return rel(out, ref), max(rel(g, r) for g, r in zip(grads, ref_grads))


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


def compile_step(config: ModelConfig, batch: int):
  """(the step compiled for `batch` without autotuning, its state, images)."""
  step, state, images = mae_step.build(config, batch)
  options = {"xla_gpu_autotune_level": 0} if jax.devices()[0].platform == "gpu" else None
  return step.lower(state, images).compile(compiler_options=options), state, images


def largest_batch(config: ModelConfig, batch: int, limit: int, multiple: int,
                  confirm: bool) -> str:
  """Where the step's device memory reaches `limit` bytes, as a line to print.

  One compile at `batch` gives its memory (XLA's analysis); the train state and the program
  are the part that does not grow with the batch, the rest grows linearly. (The gradients
  also do not grow, so the per-image part is a little high and the prediction a little low.)
  Rounded down to `multiple`; with `confirm`, compiled and run once at that batch.
  """
  start = time.perf_counter()
  compiled, state, _ = compile_step(config, batch)
  memory = compiled.memory_analysis()
  fixed = (sum(x.nbytes for x in jax.tree.leaves(state)) +
           memory.generated_code_size_in_bytes)
  per_image = (live_bytes(memory) - fixed) / batch
  predicted = int((limit - fixed) / per_image) // multiple * multiple
  line = (f"{fixed / GiB:.2f} GiB + {per_image / 2**20:.1f} MiB per image (compiled at "
          f"{batch}): largest batch {predicted}")
  del compiled, state
  if predicted < multiple:
    line += f" (under {multiple}: none fits)"
  elif confirm:
    gc.collect()
    try:
      compiled, state, images = compile_step(config, predicted)
      need = live_bytes(compiled.memory_analysis())
      jax.block_until_ready(compiled(state, images))
      line += f", needs {need / GiB:.1f} GiB, runs"
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      line += f", does not run ({str(e).strip().splitlines()[0][:120]})"
  else:
    line += " (predicted, not run: --confirm runs it)"
  return line + f" [{time.perf_counter() - start:.0f} s]"


def time_variant(variant: str, config: ModelConfig, batch: int, implementations: list[str],
                 repeats: int, steps: int, matmul: float, peak: float | None) -> None:
  """Builds the step with each attention implementation, times them round-robin, prints.

  One variant at a time, so its rows are printed (and its memory freed) before the next
  variant compiles: a run cut short by its time limit still reports what it finished.
  """
  rows = {}
  for implementation in implementations:
    name = f"{variant} batch {batch}, attention {implementation}"
    start = time.perf_counter()
    try:
      rows[name] = mae_step.jax_step(dataclasses.replace(config, attention=implementation),
                                     batch)
      print(f"  {name}: built and run once in {time.perf_counter() - start:.0f} s", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {name}: does not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
            flush=True)
  times = {name: [] for name in rows}
  for _ in range(repeats):
    for name, run in rows.items():
      start = time.perf_counter()
      for _ in range(steps):
        run()
      times[name].append((time.perf_counter() - start) / steps)
  print(f"{variant} step time, median of {repeats} x {steps} steps:")
  for name in rows:
    step_time = np.median(times[name])
    flops = metrics.train_flops_per_image(config) * batch / step_time
    spec = f", {flops / peak:.1%} of spec" if peak else ""
    print(f"  {name:52s} {step_time * 1e3:8.1f} ms  {batch / step_time:9.1f} images/s  "
          f"MFU {flops / matmul:.1%} of the measured matmul rate{spec}", flush=True)
  rows.clear()
  gc.collect()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="B/16,L/16")
  parser.add_argument("--batches", default="256,128", help="timed batch per variant")
  parser.add_argument("--attention", default="xla,cudnn",
                      help="implementations to time, comma-separated; empty: no timing")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  parser.add_argument("--no_max_batch", action="store_true", help="skip the largest batch")
  parser.add_argument("--confirm", action="store_true",
                      help="compile and run the predicted largest batch")
  parser.add_argument("--matmul", type=int, default=8192)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
  args = parser.parse_args()
  variants = args.variants.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  implementations = [a for a in args.attention.split(",") if a]
  overrides = {}
  if args.smoke:
    batches, overrides = [4] * len(variants), SMOKE
    args.repeats, args.steps, args.matmul = 1, 1, 256
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}"
        f"{' (smoke: tiny models)' if args.smoke else ''}", flush=True)
  if "cudnn" in implementations:
    for where, shape in (("encoder", (64, 50, 12, 64)), ("decoder", (64, 197, 16, 32))):
      try:
        out, grads = attention_error(shape)
        print(f"cudnn against xla attention, {where} {shape}: relative error {out:.1e} "
              f"(output), {grads:.1e} (gradients)", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"cudnn attention, {where} {shape}: does not run: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:160]}", flush=True)
  matmul = matmul_flops_per_s(args.matmul, max(args.repeats, 3))
  peak = metrics.peak_flops(device.device_kind)
  print(f"bfloat16 matmul {args.matmul}^3: {matmul / 1e12:.1f} TFLOP/s"
        + (f" ({matmul / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s spec)" if peak else ""),
        flush=True)

  configs = {v: model_config(v, dtype="bfloat16", **overrides) for v in variants}
  if implementations:
    for variant, batch in zip(variants, batches):
      time_variant(variant, configs[variant], batch, implementations, args.repeats,
                   args.steps, matmul, peak)
  if args.no_max_batch:
    return
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit", GiB)
  print(f"largest batch against the allocator's {limit / GiB:.1f} GiB"
        + ("" if "bytes_limit" in stats else " (no allocator limit known: 1 GiB pretended)")
        + ":", flush=True)
  for variant, batch in zip(variants, batches):
    config = configs[variant]
    kernel = models.attention_implementation(config.attention, config.dtype, device)
    line = largest_batch(config, 4 * batch, limit, 8, args.confirm)
    print(f"  {variant}, attention {config.attention} ({kernel}): {line}", flush=True)


if __name__ == "__main__":
  main()
