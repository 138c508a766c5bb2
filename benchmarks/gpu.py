"""The bfloat16 pretraining step on one accelerator: speed, where its time goes, what helps.

  python benchmarks/gpu.py [--variants B/16,L/16] [--batches 256,128] [--out DIR]
      [--peer torch.json] [--deadline_s 400] [--no_largest] [--no_sweep] [--smoke]
  (benchmarks/gpu.sh runs it, after benchmarks/torch_mae.py, as BENCHMARKS.md's figures use)

In this order, each part skipped (and said so) when --deadline_s would not leave it the
time its compiles take, so that a run cut short still reports the parts it finished:
  1. cuDNN's fused attention against XLA's on the model's two attention shapes: rel. error;
     XLA's bfloat16 8192^3 matmul rate, the MFU denominator measured in the same run.
  2. Each variant (the paper's decoder, mask 0.75, norm_pix_loss, bfloat16 matmuls, the
     recipe's AdamW: the trainer's own step, built by mae_step.build) at its timed batch
     with --attention: compile time, step time (median of --repeats x --steps steps, run
     back to back), images/s, MFU, and the PyTorch peer's step (--peer, torch_mae.py's
     JSON) as a ratio; a jax.profiler trace of 3 steps into DIR/traces/ and its text
     breakdown (mae_jax.trace_report). For the first variant, the step compiled again
     after clearing JAX's in-memory caches: the persistent compilation cache's warm start.
  3. Each variant at its largest batch: the timed compile's memory (XLA's analysis; the
     train state and the program are the part that does not grow with the batch) gives
     the batch that fills the allocator's limit, rounded down to 8; compiled, timed and
     traced there (or the out-of-memory error).
  4. A sweep on the first variant at its timed batch, each row timed round-robin with the
     step as shipped (loaded again from the compilation cache): XLA's autotuning off
     (xla_gpu_autotune_level=0), Triton GEMMs off (xla_gpu_enable_triton_gemm=false),
     AdamW's first moment in bfloat16. (The model has no rematerialisation option: no row.)
--smoke: tiny models, XLA attention and float32-sized steps on whatever device there is.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mae_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from mae_jax import (compile_cache, metrics, model_config, models,  # pylint: disable=g-import-not-at-top
                     trace_report)
from mae_jax.aot import live_bytes  # pylint: disable=g-import-not-at-top
from mae_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

SMOKE = dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, decoder_width=32,
             decoder_depth=1, decoder_num_heads=2)
GiB = 1 << 30
# Seconds to compile and first run a step on an H200 without a cache (BENCHMARKS.md), with
# a margin: what a part needs before it starts.
COMPILE_S = {"B/16": 60, "L/16": 100, "H/14": 150}
SWEEP = (  # (row, compiler options, AdamW first-moment dtype)
    ("XLA autotuning off (xla_gpu_autotune_level=0)", {"xla_gpu_autotune_level": 0}, None),
    ("AdamW first moment in bfloat16", None, "bfloat16"),
    ("Triton GEMMs off (xla_gpu_enable_triton_gemm=false)",
     {"xla_gpu_enable_triton_gemm": False}, None),
)


class Clock:
  """The run's time left; `allows` says (and prints) whether a part still fits."""

  def __init__(self, seconds: float):
    self.end = time.perf_counter() + seconds

  def allows(self, what: str, seconds: float) -> bool:
    left = self.end - time.perf_counter()
    if left < seconds:
      print(f"  skipped {what}: {left:.0f} s left of the deadline, it needs ~{seconds:.0f} s",
            flush=True)
    return left >= seconds


@dataclasses.dataclass
class Step:
  """A compiled train step with its state and images, ready to run."""
  name: str
  config: ModelConfig
  batch: int
  compiled: Any
  state: Any
  images: Any
  compile_s: float

  def run(self, n: int) -> None:
    """`n` steps back to back, then waits for the last."""
    for _ in range(n):
      self.state, m = self.compiled(self.state, self.images)
    jax.block_until_ready(m)


def compile_step(name: str, config: ModelConfig, batch: int, options: dict | None = None,
                 mu_dtype: str | None = None) -> Step:
  """The trainer's step for `config` at `batch`, compiled (with XLA `options`) and run once.
  Logs whether the persistent compilation cache had it."""
  step, state, images = mae_step.build(config, batch, mu_dtype=mu_dtype)
  start = time.perf_counter()
  with compile_cache.watch(f"{name} step"):
    compiled = step.lower(state, images).compile(compiler_options=options)
  built = Step(name, config, batch, compiled, state, images, time.perf_counter() - start)
  built.run(1)
  return built


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


def first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"


def matmul_flops_per_s(n: int, repeats: int) -> float:
  """FLOP/s of an [n, n] @ [n, n] bfloat16 matmul (float32 accumulation), median."""
  run, flops = mae_step.matmul(n, jnp.bfloat16)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return flops / np.median(times)


def time_steps(steps: list[Step], repeats: int, n: int) -> list[float]:
  """Median seconds per step of each, timed round-robin (each round starts one later) after
  an untimed round: the first slot after a compile or a free ran slower (CPU smoke test)."""
  for step in steps:
    step.run(n)
  times = [[] for _ in steps]
  for r in range(repeats):
    for i in [(r + j) % len(steps) for j in range(len(steps))]:
      start = time.perf_counter()
      steps[i].run(n)
      times[i].append((time.perf_counter() - start) / n)
  return [float(np.median(t)) for t in times]


def describe(step: Step, seconds: float, matmul: float, peak: float | None,
             peer: dict | None) -> str:
  """One row: ms, images/s, MFU against the measured matmul and the spec, the peer's ratio."""
  flops = metrics.train_flops_per_image(step.config) * step.batch / seconds
  line = (f"  {step.name:44s} {seconds * 1e3:8.1f} ms {step.batch / seconds:9.1f} images/s  "
          f"MFU {flops / matmul:.1%} of the measured matmul")
  if peak:
    line += f", {flops / peak:.1%} of spec"
  if peer and peer.get("batch") == step.batch:
    line += (f"; PyTorch peer {peer['step_s'] * 1e3:.1f} ms: mae_jax takes "
             f"{seconds / peer['step_s']:.2f}x its time")
  return line


def trace(step: Step, out: str, n: int = 3) -> None:
  """A profiler trace of `n` steps into OUT/traces/<step>/, and its breakdown printed (and
  written beside it as report.txt)."""
  where = os.path.join(out, "traces", step.name.replace("/", "").replace(" ", "_"))
  try:
    jax.profiler.start_trace(where, create_perfetto_trace=True)
    try:
      step.run(n)
    finally:
      jax.profiler.stop_trace()
    text = trace_report.format_report(trace_report.analyse(where, top=12))
  except Exception as e:  # pylint: disable=broad-except
    print(f"  trace of {step.name}: failed: {first_line(e)}", flush=True)
    return
  with open(os.path.join(where, "report.txt"), "w") as f:
    f.write(text + "\n")
  print("\n".join("    " + line for line in text.splitlines()), flush=True)


def largest_batch(step: Step, limit: int, multiple: int) -> tuple[int, str]:
  """The batch where `step`'s device memory reaches `limit` bytes, rounded down to
  `multiple`, from its compile: the train state and the program do not grow with the batch,
  the rest grows linearly (the gradients do not grow either, so the prediction is a little
  low). Returns (batch, how it was found)."""
  memory = step.compiled.memory_analysis()
  fixed = sum(x.nbytes for x in jax.tree.leaves(step.state)) + \
      memory.generated_code_size_in_bytes
  per_image = (live_bytes(memory) - fixed) / step.batch
  batch = int((limit - fixed) / per_image) // multiple * multiple
  return batch, (f"{fixed / GiB:.2f} GiB + {per_image / 2**20:.2f} MiB per image at batch "
                 f"{step.batch}: {batch} fills {limit / GiB:.2f} GiB")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="B/16,L/16")
  parser.add_argument("--batches", default="256,128", help="timed batch per variant")
  parser.add_argument("--attention", default="cudnn", help="the model's attention setting")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  parser.add_argument("--out", default="gpu_out", help="traces go to OUT/traces/")
  parser.add_argument("--peer", help="torch_mae.py's JSON: the PyTorch step times")
  parser.add_argument("--deadline_s", type=float, default=400,
                      help="skip the parts that would end after this many seconds")
  parser.add_argument("--no_largest", action="store_true", help="skip the largest batches")
  parser.add_argument("--no_sweep", action="store_true", help="skip the XLA option sweep")
  parser.add_argument("--matmul", type=int, default=8192)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
  args = parser.parse_args()
  clock = Clock(args.deadline_s)
  handler = logging.StreamHandler(sys.stdout)  # compile_cache's hit / miss lines
  handler.setFormatter(logging.Formatter("  %(message)s"))
  logger = logging.getLogger("mae_jax")
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  cache = compile_cache.enable(None)
  variants = args.variants.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  overrides = {}
  need = lambda variant: COMPILE_S.get(variant, 150)  # seconds a compile may take
  if args.smoke:
    batches, overrides = [8] * len(variants), SMOKE
    args.repeats, args.steps, args.matmul, args.attention = 3, 2, 256, "xla"
    need = lambda variant: 5
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}"
        f", compilation cache {cache}{' (smoke: tiny models)' if args.smoke else ''}",
        flush=True)
  if args.attention == "cudnn":
    for where, shape in (("encoder", (64, 50, 12, 64)), ("decoder", (64, 197, 16, 32))):
      try:
        out, grads = attention_error(shape)
        print(f"cudnn against xla attention, {where} {shape}: relative error {out:.1e} "
              f"(output), {grads:.1e} (gradients)", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"cudnn attention, {where} {shape}: does not run: {first_line(e)}", flush=True)
  matmul = matmul_flops_per_s(args.matmul, max(args.repeats, 3))
  peak = metrics.peak_flops(device.device_kind)
  print(f"bfloat16 matmul {args.matmul}^3: {matmul / 1e12:.1f} TFLOP/s"
        + (f" ({matmul / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s spec)" if peak else ""),
        flush=True)
  peers = {}
  if args.peer and os.path.exists(args.peer):
    with open(args.peer) as f:
      peers = json.load(f)
  configs = {v: model_config(v, dtype="bfloat16", attention=args.attention, **overrides)
             for v in variants}
  # The allocator's limit; --smoke pretends 16 MiB (a batch of a few hundred tiny images).
  limit = (device.memory_stats() or {}).get("bytes_limit") or (16 << 20 if args.smoke else None)
  largest = {}

  print(f"step time at the timed batch, attention {args.attention}, median of "
        f"{args.repeats} x {args.steps} steps:", flush=True)
  for i, (variant, batch) in enumerate(zip(variants, batches)):
    name = f"{variant} batch {batch}"
    if not clock.allows(name, need(variant)):
      continue
    try:
      step = compile_step(name, configs[variant], batch)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {name}: does not run: {first_line(e)}", flush=True)
      continue
    print(f"  {name}: compiled in {step.compile_s:.1f} s", flush=True)
    if i == 0:  # a restart: the same program from the persistent cache
      jax.clear_caches()
      start = time.perf_counter()
      with compile_cache.watch(f"{name} step, again"):
        mae_step.build(configs[variant], batch)[0].lower(step.state, step.images).compile()
      warm = time.perf_counter() - start
      print(f"  {name}: built again from the cache in {warm:.1f} s: the cold compile "
            f"takes {step.compile_s / warm:.1f}x as long", flush=True)
    (seconds,) = time_steps([step], args.repeats, args.steps)
    print(describe(step, seconds, matmul, peak, peers.get(variant)), flush=True)
    trace(step, args.out)
    if limit:
      largest[variant] = largest_batch(step, limit, 8)
    del step
    gc.collect()

  if args.no_largest:
    largest = {}
  elif not limit:
    print("largest batch: the device's allocator says no limit; not searched", flush=True)
  else:
    print(f"largest batch against the allocator's {limit / GiB:.2f} GiB:", flush=True)
  for variant, (batch, how) in largest.items():
    print(f"  {variant}: {how}", flush=True)
    name = f"{variant} batch {batch}"
    if batch < 8 or not clock.allows(name, need(variant)):
      continue
    try:
      step = compile_step(name, configs[variant], batch)
      (seconds,) = time_steps([step], args.repeats, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      print(f"  {name}: does not run: {first_line(e)}", flush=True)
      continue
    print(describe(step, seconds, matmul, peak, peers.get(variant)), flush=True)
    trace(step, args.out)
    del step
    gc.collect()

  if args.no_sweep:
    return
  variant, batch = variants[0], batches[0]
  print(f"sweep, {variant} batch {batch}, each row timed round-robin with the step as shipped "
        "(the model has no rematerialisation option):", flush=True)
  if not clock.allows("the sweep", need(variant) / 2):
    return
  base = compile_step(f"{variant} as shipped", configs[variant], batch)  # from the cache
  for row, options, mu_dtype in SWEEP:
    if not clock.allows(row, need(variant)):
      break
    try:
      step = compile_step(row, configs[variant], batch, options, mu_dtype)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {row}: does not run: {first_line(e)}", flush=True)
      continue
    base_s, seconds = time_steps([base, step], args.repeats, args.steps)
    print(describe(base, base_s, matmul, peak, None), flush=True)
    print(describe(step, seconds, matmul, peak, None)
          + f"; {base_s / seconds:.2f}x the shipped step's speed, built in "
          f"{step.compile_s:.0f} s", flush=True)
    del step
    gc.collect()


if __name__ == "__main__":
  main()
