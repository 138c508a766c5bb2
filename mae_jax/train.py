"""MAE pretraining loop: data -> sharded train step -> metrics, reconstructions, checkpoints.

`train_and_evaluate(config, workdir)` runs (or resumes) a run in `workdir`:
  WORKDIR/checkpoints/<step>/   Orbax: train state, data iterator state, config
  WORKDIR/tensorboard/          TensorBoard events
  WORKDIR/metrics.jsonl         the same scalars, one JSON object per log step
  WORKDIR/reconstructions/      PNG grids: original | masked | reconstruction | + visible
  WORKDIR/config.json           the full run config
Every check on the config, the devices and the data happens before anything is compiled
or written.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mae_jax import checkpointing, metrics as metrics_lib, optim, sharding, visualize
from mae_jax.config import ModelConfig, config_from_dict
from mae_jax.data import pipeline
from mae_jax.mae import MAEOutput, forward
from mae_jax.train_step import (State, abstract_state, check_batch, create_state,
                                make_train_step)

log = logging.getLogger(__name__)


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  """`config.model` (every ModelConfig field) -> the frozen ModelConfig, checked."""
  return config_from_dict(config.model.to_dict())


@dataclasses.dataclass(frozen=True)
class Plan:
  """Step counts of a run, derived from the config and the dataset size."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  stop_step: int  # this invocation stops here (== total_steps unless config.stop_at_step)
  peak_lr: float


def plan_run(config: ml_collections.ConfigDict, num_examples: int) -> Plan:
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"the dataset has {num_examples} examples, fewer than one global batch "
                     f"of {config.batch_size}")
  total = config.total_steps if config.total_steps > 0 else round(config.epochs *
                                                                   steps_per_epoch)
  warmup = config.warmup_steps if config.warmup_steps >= 0 else round(config.warmup_epochs *
                                                                      steps_per_epoch)
  stop = config.stop_at_step if config.stop_at_step > 0 else total
  if stop > total:
    raise ValueError(f"stop_at_step {stop} is past the end of the run ({total} steps)")
  peak = config.lr if config.lr > 0 else optim.learning_rate(config.base_lr, config.batch_size)
  return Plan(steps_per_epoch, total, warmup, stop, peak)


# Input settings a resumed run may change: where the data lives and how it is read.
FREE_INPUT_FIELDS = ("data_dir", "eval_split", "worker_count", "worker_buffer_size")


def run_signature(config: ml_collections.ConfigDict, plan: Plan) -> dict[str, Any]:
  """What a resumed run must share with the run that wrote the checkpoint: the data order
  and augmentation, the hosts, the masks and the optimisation (the model is compared
  separately). JSON-normalised, as it is stored with each checkpoint."""
  inputs = {k: v for k, v in config.input.to_dict().items() if k not in FREE_INPUT_FIELDS}
  return json.loads(json.dumps({
      "batch_size": config.batch_size, "seed": config.seed, "input": inputs,
      "process_count": jax.process_count(), "total_steps": plan.total_steps,
      "warmup_steps": plan.warmup_steps, "peak_lr": plan.peak_lr,
      "weight_decay": config.weight_decay, "b1": config.b1, "b2": config.b2}))


def check_resumable(workdir: str, saved: dict[str, Any], model: ModelConfig,
                    run: dict[str, Any], plan: Plan) -> None:
  """Refuses to resume a checkpoint of another model or another run, naming the fields.

  The activation dtype may change (the parameters are float32 either way).
  """
  saved_model = config_from_dict(saved["model"])
  diff = {k: (v, getattr(model, k)) for k, v in saved_model.to_dict().items()
          if getattr(model, k) != v and k != "dtype"}
  if diff:
    raise ValueError(f"{workdir} holds a checkpoint of another model; (saved, config): "
                     f"{diff}. Use a new workdir or the saved model config")
  diff = {k: (v, run.get(k)) for k, v in saved["run"].items() if run.get(k) != v}
  if diff:
    raise ValueError(f"{workdir} holds a checkpoint of a run with other settings; "
                     f"(saved, config): {diff}. Resuming would not continue that run: use a "
                     f"new workdir or the saved settings")
  if saved["step"] > plan.stop_step:
    raise ValueError(f"{workdir} is at step {saved['step']}, past the requested stop at step "
                     f"{plan.stop_step}")


def optimizer(config: ml_collections.ConfigDict, plan: Plan):
  """(lr schedule, AdamW) of the recipe for this run."""
  schedule = optim.lr_schedule(plan.peak_lr, plan.warmup_steps, plan.total_steps)
  return schedule, optim.make_optimizer(schedule, weight_decay=config.weight_decay,
                                        b1=config.b1, b2=config.b2)


def every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0


class Preemption:
  """Tells when to save and exit on SIGTERM (preemption), on one host or on all of them.

  Multi-process runs use JAX's preemption sync point (every host saves at the same step);
  a single process sets a flag from its own SIGTERM handler.
  """

  def __init__(self, manager):
    self._manager = manager
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def reached(self, step: int) -> bool:
    return self._manager.reached_preemption(step) if self._multi else self._flag.is_set()

  def close(self) -> None:
    if hasattr(self, "_previous"):
      signal.signal(signal.SIGTERM, self._previous)


def fetch(values: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(values).items()}


def timings(elapsed: float, steps: int, step: int, plan: Plan, batch_size: int,
            flops_per_step: float, peak_flops: float | None) -> dict[str, float]:
  """Step time, throughput, ETA and (on known accelerators) model FLOP utilisation."""
  step_time = elapsed / steps
  out = {"step_time_s": step_time, "images_per_s": batch_size / step_time,
         "eta_s": step_time * (plan.total_steps - step)}
  if peak_flops:
    out["mfu"] = flops_per_step / step_time / (peak_flops * jax.device_count())
  return out


def check_finite(step: int, values: dict[str, float], ckpt: checkpointing.TrainCheckpointer,
                 workdir: str) -> None:
  if not all(math.isfinite(v) for v in values.values()):
    raise FloatingPointError(
        f"non-finite training metrics at step {step}: {values}; stopping without saving. "
        f"The last good checkpoint (step {ckpt.latest_step()}) stays in {workdir}/checkpoints")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Pretrains (or resumes) MAE as configured; returns the final train state."""
  # --- Checks: nothing compiled or written before these pass. ---
  model = model_config_from(config)
  check_batch(config.batch_size, jax.device_count(), config.grad_accum_steps)
  if "://" in workdir or os.path.isfile(workdir):
    raise ValueError(f"workdir {workdir!r} must be a directory path on a filesystem every host "
                     "sees (for a bucket, mount it, e.g. with gcsfuse)")
  source = pipeline.make_source(config.input, config.input.split)
  plan = plan_run(config, len(source))
  run = run_signature(config, plan)
  saved = checkpointing.read_saved_run(workdir)
  if saved is not None:
    check_resumable(workdir, saved, model, run, plan)
  schedule, tx = optimizer(config, plan)
  loader = pipeline.make_train_loader(config.input, image_size=model.image_size,
                                      global_batch_size=config.batch_size, seed=config.seed,
                                      source=source)
  recon_images = (pipeline.make_eval_batch(config.input, image_size=model.image_size,
                                           num_images=config.num_recon_images)
                  if config.recon_every_steps > 0 else None)

  # --- Set-up. ---
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.fsdp)
  abstract = abstract_state(model, tx)
  shardings = sharding.tree_sharding(mesh, abstract)
  data_iter = iter(loader)
  ckpt = checkpointing.TrainCheckpointer(workdir, keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state = ckpt.restore(target, data_iter)
    log.info("resumed from step %d in %s", int(state["step"]), workdir)
  else:
    state = create_state(model, tx, jax.random.key(config.seed), mesh)
  train_step = make_train_step(model, tx, schedule, mesh, abstract,
                               grad_accum_steps=config.grad_accum_steps, seed=config.seed)
  saved_config = {"model": model.to_dict(), "run": run,
                  "config": json.loads(config.to_json_best_effort())}
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  reconstruct = make_reconstruct(model, mesh)
  preemption = Preemption(ckpt.manager)
  batch_sharding = sharding.batch_sharding(mesh)
  flops = metrics_lib.train_flops_per_image(model) * config.batch_size
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  try:
    step = first_step = int(state["step"])
    log.info("training %s from step %d to %d (%d steps/epoch, peak lr %.3g)",
             model, step, plan.stop_step, plan.steps_per_epoch, plan.peak_lr)
    if step == plan.stop_step:
      log.warning("%s is already at step %d: nothing to train", workdir, step)
    skipped, previous, timer_step, timer = 0, None, step, time.perf_counter()
    while step < plan.stop_step:
      batch = next(data_iter)
      skipped += int(batch["skipped"].sum())
      state, step_metrics = train_step(
          state, pipeline.to_global_array(batch["image"], batch_sharding))
      step += 1
      if previous is not None:  # check the previous step while this one runs
        check_finite(previous[0], fetch(previous[1]), ckpt, workdir)
      previous = (step, step_metrics)
      if step == first_step + 1:  # leave compilation out of the timings
        jax.block_until_ready(step_metrics)
        timer_step, timer = step, time.perf_counter()
      if every(step, config.log_every_steps) or step == plan.stop_step:
        values = fetch(step_metrics)
        check_finite(step, values, ckpt, workdir)
        previous = None  # checked
        if step > timer_step:
          values.update(timings(time.perf_counter() - timer, step - timer_step, step, plan,
                                config.batch_size, flops, peak))
          timer_step, timer = step, time.perf_counter()
          metrics_lib.log_progress(step, plan.total_steps, values)
        values.update(epoch=step / plan.steps_per_epoch, data_skipped=skipped)
        writer.scalars(step, values)
      if recon_images is not None and (every(step, config.recon_every_steps)
                                       or step == plan.stop_step):
        write_reconstructions(workdir, step, reconstruct(state["params"], recon_images),
                              recon_images, model, config, writer)
      preempted = preemption.reached(step)
      if (preempted or every(step, config.checkpoint_every_steps)
          or step == plan.stop_step):
        if previous is not None:  # never save a state whose step was not checked
          check_finite(step, fetch(step_metrics), ckpt, workdir)
          previous = None
        ckpt.save(step, state, data_iter, saved_config, force=True)
      if preempted:
        log.warning("preempted (SIGTERM): saved step %d, exiting", step)
        break
  finally:
    preemption.close()
    writer.close()
    ckpt.close()
  return state


def make_reconstruct(model: ModelConfig, mesh):
  """Jitted `(params, images) -> MAEOutput` with the same masks every time, replicated
  over the mesh, so every process takes part and process 0 can read the result."""
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def run(params, images):
    noise = jax.random.uniform(jax.random.key(0), (images.shape[0], model.num_patches))
    return forward(params, images, None, model, noise)
  return lambda params, images: run(params, jax.device_put(images, replicated))


def write_reconstructions(workdir: str, step: int, out: MAEOutput, images: np.ndarray,
                          model: ModelConfig, config: ml_collections.ConfigDict,
                          writer: metrics_lib.MetricWriter) -> None:
  """Process 0 writes the reconstruction grid of `out` as a PNG and to TensorBoard."""
  if jax.process_index() != 0:
    return
  panels = visualize.reconstruction_panels(images, jax.device_get(out), model,
                                           tuple(config.input.mean), tuple(config.input.std))
  grid = visualize.grid_image(panels)
  os.makedirs(os.path.join(workdir, "reconstructions"), exist_ok=True)
  visualize.save_png(os.path.join(workdir, "reconstructions", f"step_{step:08d}.png"), grid)
  writer.image(step, "reconstructions", grid)
