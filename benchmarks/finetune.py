"""Fine-tuning speed, timed round-robin in one run:

  python benchmarks/finetune.py pipeline [--batches 6] [--repeats 3] [--data_dir DIR]
  python benchmarks/finetune.py step [--variant B/16] [--batch 8] [--repeats 3]

`pipeline`: images/s of one host's input pipeline in this process (worker_count 0: one CPU
core), pretraining's (crop + flip; uint8, normalised on the device) next to fine-tuning's
(+ RandAugment rand-m9-mstd0.5-inc1 + random erasing), on the bundled demo photographs at
224 px; both are `pipeline.make_train_loader` with the configs' input fields. Mixup /
CutMix run on the device inside the step and are timed there.

`step`: the fine-tuning train step (`make_train_step` of the `finetune` task of
configs/finetune.py: drop path, Mixup / CutMix, AdamW with layer-wise lr decay), float32,
next to transformers' `ViTForImageClassification` (timm is not installed here) with the
same architecture, forward + backward + torch.optim.AdamW on soft targets, same batch.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from configs import base, finetune
from mae_jax.data import demo, pipeline


def pipeline_rows(args) -> dict:
  data_dir = args.data_dir or tempfile.mkdtemp()
  if not args.data_dir:
    demo.build_demo(data_dir)
  rows = {}
  plain = finetune.get_config().input.to_dict()
  plain.update(randaugment=None, reprob=0.0)
  for name, inputs in (
      ("pretraining input (crop 0.2-1, flip; uint8, normalised on the device)",
       base.get_config().input.to_dict()),
      ("fine-tuning input (crop 0.08-1, + RandAugment, random erasing)",
       finetune.get_config().input.to_dict()),
      ("fine-tuning input without RandAugment and erasing (crop 0.08-1)", plain)):
    inputs.update(dataset="demo", data_dir=data_dir, worker_count=0)
    loader = pipeline.make_train_loader(_Fields(inputs), image_size=224, global_batch_size=32,
                                        seed=0)
    it = iter(loader)
    next(it)  # warm up

    def run(it=it):
      for _ in range(args.batches):
        next(it)
    rows[name] = (run, 32 * args.batches)
  return rows


class _Fields:
  def __init__(self, fields):
    self.__dict__.update(fields)


def step_rows(args) -> dict:
  from mae_jax import sharding
  from mae_jax.tasks import make_task
  from mae_jax.trainer import abstract_state, create_state, make_train_step
  import torch
  from transformers import ViTConfig, ViTForImageClassification

  config = finetune.get_config(f"variant={args.variant}").unlock()
  config.model.dtype = "float32"
  config.init_from = "random"
  task = make_task(config)
  mesh = sharding.make_mesh()
  schedule, tx = task.optimizer(1e-3, 0, 1000)
  holder = {"state": create_state(task, tx, jax.random.key(0), mesh)}
  step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx))
  size, b = task.image_size, args.batch
  data = {"image": jax.random.normal(jax.random.key(1), (b, size, size, 3)),
          "label": jax.numpy.arange(b) % 1000}
  data = jax.device_put(data, sharding.batch_sharding(mesh))

  def jax_run():
    holder["state"], m = step(holder["state"], data)
    jax.block_until_ready(m)

  enc = task.encoder
  model = ViTForImageClassification(ViTConfig(
      hidden_size=enc.width, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
      intermediate_size=enc.mlp_dim, image_size=size, patch_size=enc.patch_size,
      num_labels=1000, layer_norm_eps=1e-6)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05)
  images = torch.randn(b, 3, size, size)
  targets = torch.softmax(torch.randn(b, 1000), -1)

  def torch_run():
    opt.zero_grad()
    logits = model(images).logits
    loss = torch.sum(-targets * torch.log_softmax(logits, -1), -1).mean()
    loss.backward()
    opt.step()

  jax_run(), torch_run()  # compile / warm up
  return {f"mae_jax fine-tuning step ({args.variant}, {size} px)": (jax_run, b),
          "transformers ViTForImageClassification + torch AdamW": (torch_run, b)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=("pipeline", "step"))
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  rows = pipeline_rows(args) if args.what == "pipeline" else step_rows(args)
  times = {name: [] for name in rows}
  for _ in range(args.repeats):  # rows interleaved
    for name, (run, _) in rows.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  first = None
  print(f"{args.what}: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, median of "
        f"{args.repeats}")
  for name, t in times.items():
    rate = rows[name][1] / np.median(t)
    first = first or rate
    print(f"  {name:72s} {rate:8.3g} img/s  {np.median(t) * 1e3:9.0f} ms  x{rate / first:5.2f}")


if __name__ == "__main__":
  main()
