"""One MAE pretraining step (forward, backward, AdamW) timed side by side, in one run.

  python benchmarks/mae_step.py [--variant B/16] [--batch 16] [--repeats 5] [--torch] [--levers]
      [--decoder_depth 1] [--no_gelu_rows]

Rows, each timed round-robin with the others so machine drift hits all alike (each
round starts one row later, so no row always runs right after the same other):
  * mae_jax as shipped: the encoder sees only the visible 25% of the patches;
  * the paper's ablation with mask tokens in the encoder (all patches): the speedup of the
    real design is the ratio of the two;
  * mae_jax with jax.nn.gelu's erfc form and with the tanh approximation in place of the erf
    GELU, to show what exact GELU costs;
  * with --levers, mae_jax with attention written as einsums ([B, H, N, N] scores) and
    with the heads folded into the batch ([B*H, N, Dh] batched matmuls);
  * a control: the first row's program built again after the others;
  * with --torch, the same step in PyTorch (transformers' ViTMAEForPreTraining, AdamW), the
    reference architecture, on the same number of threads;
  * XLA's own rate on one large float32 matmul (--matmul N: N x N x N), timed in the same
    round-robin: each mae_jax row also prints its model FLOP/s (`train_flops_per_image`, the
    MFU numerator the trainer logs) as a fraction of that rate, a number that carries over to
    accelerators where a ratio to PyTorch on a CPU does not.
Float32 throughout (XLA on CPU has no fast bfloat16 matmul). Prints median ms per step and
each row relative to the first.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import jax
import numpy as np

from configs import base
from mae_jax import model_config, models, optim, sharding
from mae_jax.metrics import train_flops_per_image
from mae_jax.tasks.pretrain import PretrainTask
from mae_jax.trainer import abstract_state, create_state, make_train_step

GELUS = {"erfc": lambda x: jax.nn.gelu(x, approximate=False),
         "tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def attend_einsum(q, k, v, attention="auto"):
  """Attention written out: scores as [B, H, N, N], softmax in float32 (`attention`, the
  model's kernel setting, is not used)."""
  del attention
  scores = jax.numpy.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
  weights = jax.nn.softmax(scores.astype(jax.numpy.float32), axis=-1).astype(v.dtype)
  return jax.numpy.einsum("bhqk,bkhd->bqhd", weights, v)


def attend_folded(q, k, v, attention="auto"):
  """Heads folded into the batch: [B*H, N, Dh] operands for plain batched matmuls
  (`attention`, the model's kernel setting, is not used)."""
  del attention
  b, n, h, dh = q.shape
  fold = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, n, dh)  # [B*H, N, Dh]
  q, k, v = fold(q), fold(k), fold(v)
  scores = jax.numpy.matmul(q, k.transpose(0, 2, 1)) / np.sqrt(dh).astype(q.dtype)
  weights = jax.nn.softmax(scores.astype(jax.numpy.float32), axis=-1).astype(v.dtype)
  return jax.numpy.matmul(weights, v).reshape(b, h, n, dh).transpose(0, 2, 1, 3)


ATTENDS = {"einsum": attend_einsum, "folded": attend_folded}


def build(config, batch: int, mu_dtype: str | None = None) -> tuple[Callable, dict, dict]:
  """The trainer's jitted step (not yet compiled), its train state and a batch of images;
  `mu_dtype`: AdamW's first moment in that dtype (optim.make_optimizer)."""
  run_config = base.get_config().unlock()
  run_config.model.update(config.to_dict())
  task = PretrainTask(run_config)  # the recipe's AdamW, as in a real run
  mesh = sharding.make_mesh()
  schedule, tx = task.optimizer(1e-4, 0, 1000)
  if mu_dtype:
    tx = optim.make_optimizer(schedule, weight_decay=run_config.weight_decay, b1=run_config.b1,
                              b2=run_config.b2, mu_dtype=mu_dtype)
  state = create_state(task, tx, jax.random.key(0), mesh)
  step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx))
  images = {"image": jax.device_put(
      jax.random.normal(jax.random.key(1), (batch, config.image_size, config.image_size, 3)),
      sharding.batch_sharding(mesh))}
  return step, state, images


def jax_step(config, batch: int, gelu: str | None = None,
             attend: str | None = None) -> Callable[[], None]:
  """A ready-to-run closure doing one train step; compiled before returning."""
  step, state, images = build(config, batch)
  holder = {"state": state}
  shipped = models.gelu, models.attend
  if gelu:
    models.gelu = GELUS[gelu]  # traced into this step only
  if attend:
    models.attend = ATTENDS[attend]
  try:
    holder["state"], m = step(holder["state"], images)
    jax.block_until_ready(m)
  finally:
    models.gelu, models.attend = shipped

  def run():
    holder["state"], m = step(holder["state"], images)
    jax.block_until_ready(m)
  return run


def matmul(n: int, dtype=jax.numpy.float32) -> tuple[Callable[[], None], float]:
  """A closure doing [n, n] @ [n, n] in XLA (float32 accumulation) enough times to take ~1 s
  (one call is too short to time beside a step), compiled before returning; and its FLOPs.
  The rate a step's model FLOP/s is compared with, here and in gpu.py."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: jax.numpy.dot(x, y, preferred_element_type=jax.numpy.float32))
  jax.block_until_ready(f(a, b))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(f(a, b))
  reps = max(1, round(1.0 / ((time.perf_counter() - start) / 3)))

  def run():
    for _ in range(reps):
      jax.block_until_ready(f(a, b))
  return run, reps * 2.0 * n**3


def torch_step(config, batch: int) -> Callable[[], None]:
  import torch
  from transformers import ViTMAEConfig, ViTMAEForPreTraining
  torch.manual_seed(0)
  hf = ViTMAEConfig(
      hidden_size=config.width, num_hidden_layers=config.depth,
      num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
      image_size=config.image_size, patch_size=config.patch_size,
      decoder_hidden_size=config.decoder_width, decoder_num_hidden_layers=config.decoder_depth,
      decoder_num_attention_heads=config.decoder_num_heads,
      decoder_intermediate_size=config.decoder_mlp_dim, mask_ratio=config.mask_ratio,
      norm_pix_loss=config.norm_pix_loss, layer_norm_eps=config.layer_norm_eps,
      hidden_act="gelu")
  model = ViTMAEForPreTraining(hf).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  images = torch.randn(batch, 3, config.image_size, config.image_size)

  def run():
    opt.zero_grad(set_to_none=True)
    model(pixel_values=images).loss.backward()
    opt.step()
  run()
  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch", action="store_true")
  parser.add_argument("--matmul", type=int, default=2048)
  parser.add_argument("--decoder_depth", type=int, default=None,
                      help="decoder blocks (default: the paper's 8); the paper's mask speedup "
                           "table has 8 and 1")
  parser.add_argument("--no_gelu_rows", action="store_true",
                      help="leave out the two GELU rows (shorter runs at large variants)")
  parser.add_argument("--levers", action="store_true",
                      help="also time attention written as einsums and with heads folded "
                           "into the batch")
  args = parser.parse_args()
  depth = {} if args.decoder_depth is None else {"decoder_depth": args.decoder_depth}
  config = model_config(args.variant, dtype="float32", **depth)
  ablation = model_config(args.variant, dtype="float32", encoder_mask_tokens=True, **depth)
  rows = {
      "mae_jax (encoder on visible patches)": jax_step(config, args.batch),
      "ablation: mask tokens in the encoder": jax_step(ablation, args.batch),
  }
  if not args.no_gelu_rows:
    rows["mae_jax with jax.nn.gelu erfc form"] = jax_step(config, args.batch, "erfc")
    rows["mae_jax with tanh GELU (not faithful)"] = jax_step(config, args.batch, "tanh")
  if args.levers:
    for attend, what in (("einsum", "einsums [B,H,N,N]"), ("folded", "heads in batch")):
      name = f"mae_jax, attention as {what}"
      rows[name] = jax_step(config, args.batch, attend=attend)
  # The same program as the first row, built last: identical steps built at different
  # times differ by several percent here (3.66 vs 3.41 s, B/16 batch 8), so this row shows
  # how far apart two rows must be to mean anything.
  rows["control: mae_jax as shipped, built last"] = jax_step(config, args.batch)
  # Every mae_jax row computes the shipped model's FLOPs, but the ablation.
  flops = {name: train_flops_per_image(ablation if name.startswith("ablation") else config)
           for name in rows}
  if args.torch:
    import torch
    torch.set_num_threads(os.cpu_count())
    rows[f"PyTorch {torch.__version__} ViTMAE (reference arch)"] = torch_step(config,
                                                                               args.batch)
  matmul_row = f"XLA float32 matmul {args.matmul}^3"
  rows[matmul_row], matmul_flops = matmul(args.matmul)
  times = {name: [] for name in rows}
  names = list(rows)
  for r in range(args.repeats):  # each round starts one row later: no row is always first
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      rows[name]()
      times[name].append(time.perf_counter() - start)
  first = np.median(next(iter(times.values())))
  print(f"{args.variant} {config.image_size}px, decoder depth {config.decoder_depth}, "
        f"batch {args.batch}, float32, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, "
        f"median of {args.repeats}")
  matmul_rate = matmul_flops / np.median(times.pop(matmul_row))
  print(f"  {matmul_row:44s} {matmul_rate / 1e9:9.1f} GFLOP/s")
  for name, t in times.items():
    line = f"  {name:44s} {np.median(t) * 1e3:9.1f} ms/step   x{np.median(t) / first:5.2f}"
    if name in flops:
      rate = flops[name] * args.batch / np.median(t)
      line += f"   {rate / 1e9:7.1f} GFLOP/s = {rate / matmul_rate:4.0%} of the matmul's"
    print(line)


if __name__ == "__main__":
  main()
