"""Linear-probe step vs MAE pretraining step, images/s, timed round-robin in one run.

  python benchmarks/probe_step.py [--variant B/16] [--batch 16] [--repeats 5]

Both steps are the trainer's own (`mae_jax.trainer.make_train_step`) built from the tasks of
configs/base.py and configs/linear_probe.py, float32 on this CPU. The probe's frozen encoder
runs forward only on all patches; pretraining runs forward and backward on the visible 25%
plus the decoder.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from configs import base, linear_probe
from mae_jax import sharding
from mae_jax.tasks import make_task
from mae_jax.trainer import abstract_state, create_state, make_train_step


def step_fn(config, batch: int):
  """A ready-to-run closure doing one train step of the config's task; compiled first."""
  task = make_task(config)
  mesh = sharding.make_mesh()
  schedule, tx = task.optimizer(1e-3, 0, 1000)
  state = create_state(task, tx, jax.random.key(0), mesh)
  step = make_train_step(task, tx, schedule, mesh, abstract_state(task, tx))
  size = task.image_size
  data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
          "label": jax.numpy.arange(batch) % config.get("num_classes", 1)}
  data = {k: jax.device_put(data[k], sharding.batch_sharding(mesh)) for k in task.batch_keys}
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], data)
    jax.block_until_ready(m)
  run()
  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  pretrain = base.get_config(f"variant={args.variant}").unlock()
  pretrain.model.dtype = "float32"
  probe = linear_probe.get_config(f"variant={args.variant}").unlock()
  probe.model.dtype = "float32"
  probe.init_from = "random"
  rows = {"MAE pretraining step (forward + backward, AdamW)": step_fn(pretrain, args.batch),
          "linear-probe step (frozen encoder forward, LARS head)": step_fn(probe, args.batch)}
  times = {name: [] for name in rows}
  for _ in range(args.repeats):
    for name, run in rows.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  first = np.median(next(iter(times.values())))
  print(f"{args.variant}, batch {args.batch}, float32, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} cpus, median of {args.repeats}")
  for name, t in times.items():
    med = np.median(t)
    print(f"  {name:56s} {med * 1e3:8.1f} ms/step {args.batch / med:7.1f} img/s  "
          f"x{first / med:5.2f} images/s of the first row")


if __name__ == "__main__":
  main()
