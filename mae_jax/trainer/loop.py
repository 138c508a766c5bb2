"""The training loop every task shares: data -> sharded step -> metrics, evaluators, checkpoints.

`train_and_evaluate(config, workdir)` runs (or resumes) the task `config.task` in `workdir`:
  WORKDIR/checkpoints/<step>/   Orbax: train state and config (the data position is the step)
  WORKDIR/tensorboard/          TensorBoard events
  WORKDIR/metrics.jsonl         the same scalars, one JSON object per log step
  WORKDIR/config.json           the full run config
  WORKDIR/results.json          the evaluators' scalars at the last step (when there are any)
  WORKDIR/best/<step>/          with `config.best_metric`: the state with the best value of it
With `config.eval_only`, the state (restored, or from `init_from`) is only evaluated.
and whatever its evaluators write (e.g. reconstructions/). Every check on the config, the
devices, the data and `init_from` happens before anything is compiled or written.
"""
from __future__ import annotations

import json
import logging
import math
import time

import jax
import ml_collections
import numpy as np

from mae_jax import (checkpointing, compile_cache, evals, metrics as metrics_lib, models,
                     profiling, sharding, storage, tasks)
from mae_jax.data import pipeline
from mae_jax.trainer.preemption import Preemption
from mae_jax.trainer.setup import (Plan, check_resumable, checkpoint_config,
                                   plan_and_optimizer, run_signature)
from mae_jax.trainer.step import State, abstract_state, check_batch, create_state, \
    make_train_step

log = logging.getLogger(__name__)


def every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0


def fetch(values: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(values).items()}


def timings(elapsed: float, steps: int, step: int, plan: Plan, batch_size: int,
            flops_per_step: float | None, peak_flops: float | None) -> dict[str, float]:
  """Step time, throughput, ETA and (on known accelerators) model FLOP utilisation."""
  step_time = elapsed / steps
  out = {"step_time_s": step_time, "images_per_s": batch_size / step_time,
         "eta_s": step_time * (plan.total_steps - step)}
  if peak_flops and flops_per_step:
    out["mfu"] = flops_per_step / step_time / (peak_flops * jax.device_count())
  return out


def check_finite(step: int, values: dict[str, float], ckpt: checkpointing.TrainCheckpointer,
                 workdir: str) -> None:
  if not all(math.isfinite(v) for v in values.values()):
    raise FloatingPointError(
        f"non-finite training metrics at step {step}: {values}; stopping without saving. "
        f"The last good checkpoint (step {ckpt.latest_step()}) stays in {workdir}/checkpoints")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Trains (or resumes) the configured task; returns the final train state."""
  # --- Checks: nothing compiled or written before these pass. ---
  task = tasks.make_task(config)
  model = task.model_dict()
  models.attention_implementation(model["attention"], model["dtype"], jax.devices()[0])
  check_batch(config.batch_size, jax.device_count(), config.grad_accum_steps)
  storage.check(workdir, "workdir")
  profiling.check(config.profile)
  if storage.path(workdir).is_file():
    raise ValueError(f"workdir {workdir!r} is a file; it must be a directory that every host "
                     "sees (a shared filesystem, or a bucket: gs://bucket/path)")
  source = task.train_source()
  plan, schedule, tx = plan_and_optimizer(config, task, len(source))
  run = run_signature(config, plan, len(source))
  saved = checkpointing.read_saved_run(workdir)
  if saved is not None:
    check_resumable(workdir, saved, task, run, plan, config)
  init_from = config.get("init_from")
  loaded = task.load_init(init_from) if init_from and saved is None else None
  # The data position is the step: a run at step k reads global batch k next.
  loader = task.train_loader(source, start_batch=saved["step"] if saved else 0)
  mesh = sharding.make_mesh(config.fsdp, num_slices=config.num_slices)
  evaluators = evals.make_evaluators(config, task, mesh)
  best_metric = config.get("best_metric")  # e.g. 'classification/top1' (fine-tuning)
  if best_metric and best_metric.split("/")[0] not in {e.name for e in evaluators}:
    raise ValueError(f"config.best_metric {best_metric!r} names no configured evaluator "
                     f"({', '.join(e.name for e in evaluators) or 'none'})")

  # --- Set-up. ---
  is_main = jax.process_index() == 0
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  if is_main and not (config.get("eval_only") and saved is not None):  # keep the run's own
    (storage.path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  abstract = abstract_state(task, tx)
  shardings = sharding.tree_sharding(mesh, abstract)
  ckpt = checkpointing.TrainCheckpointer(workdir, keep=config.keep_checkpoints)
  best = checkpointing.BestCheckpointer(workdir, best_metric) if best_metric else None
  if ckpt.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state = ckpt.restore(target)
    log.info("resumed from step %d in %s", int(state["step"]), workdir)
  else:
    state = create_state(task, tx, jax.random.key(config.seed), mesh)
    if loaded is not None:
      state = start_from(task, tx, state, loaded, shardings, mesh)
      log.info("initialised from %s", init_from)
  train_step = make_train_step(task, tx, schedule, mesh, abstract,
                               grad_accum_steps=config.grad_accum_steps, seed=config.seed)
  saved_config = checkpoint_config(task, run, config)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  preemption = Preemption(ckpt.manager, int(state["step"]))
  batch_sharding = sharding.batch_sharding(mesh)
  flops = task.flops_per_example()
  flops = flops * config.batch_size if flops else None
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  tracer = profiling.StepTracer(config.profile, workdir)
  results = {}
  try:
    step = first_step = int(state["step"])
    if config.get("eval_only"):
      log.info("evaluating %s at step %d (eval_only)", task.name, step)
      results = run_evaluators(evaluators, state, step, workdir, writer)
      write_results(workdir, step, results)
      return state
    data_iter = iter(loader)
    if step == plan.stop_step:
      log.warning("%s is already at step %d: nothing to train", workdir, step)
    else:
      log.info("training %s %s from step %d to %d (%d steps/epoch, peak lr %.3g)",
               task.name, task.model_dict(), step, plan.stop_step, plan.steps_per_epoch,
               plan.peak_lr)
    skipped, previous, timer_step, timer = 0, None, step, time.perf_counter()
    waited = 0.0  # seconds spent in next(data_iter) since the timer started
    start, losses = timer, {}  # losses: {step: logged loss} at the log steps, for the summary
    interval = []  # each step's loss since the last log: the log shows their mean

    def checked(step: int, step_metrics: dict[str, jax.Array]) -> dict[str, float]:
      values = fetch(step_metrics)
      check_finite(step, values, ckpt, workdir)
      interval.append(values["loss"])
      return values

    for evaluator in evaluators if step < plan.stop_step else ():
      if hasattr(evaluator, "start"):  # optional, see evals.Evaluator
        evaluator.start(state, step, workdir)
    while step < plan.stop_step:
      wait_start = time.perf_counter()
      batch = next(data_iter)
      waited += time.perf_counter() - wait_start
      skipped += int(batch["skipped"].sum())
      global_batch = pipeline.to_global_array({k: batch[k] for k in task.batch_keys},
                                              batch_sharding)
      tracer.before(step, state)
      with compile_cache.watch("train step", enabled=step == first_step):
        state, step_metrics = train_step(state, global_batch)
      step += 1
      tracer.after(step, step_metrics)
      if previous is not None:  # check the previous step while this one runs
        checked(*previous)
      previous = (step, step_metrics)
      if step == first_step + 1:  # leave compilation out of the timings
        jax.block_until_ready(step_metrics)
        timer_step, timer, waited = step, time.perf_counter(), 0.0
      if every(step, config.log_every_steps) or step == plan.stop_step:
        values = checked(step, step_metrics)
        previous = None  # checked
        # The mean over the steps since the last log: one step's loss is noisy.
        values["loss"] = sum(interval) / len(interval)
        interval.clear()
        losses[step] = values["loss"]
        if step > timer_step:
          values.update(timings(time.perf_counter() - timer, step - timer_step, step, plan,
                                config.batch_size, flops, peak))
          # Per step, the loop's wait for the host's next batch (the device may still be
          # running the previous step meanwhile: an upper bound on its idle time).
          values["data_wait_s"] = waited / (step - timer_step)
          timer_step, timer, waited = step, time.perf_counter(), 0.0
          metrics_lib.log_progress(step, plan.total_steps, values)
        values.update(epoch=step / plan.steps_per_epoch, data_skipped=skipped)
        writer.scalars(step, values)
      due = [e for e in evaluators if every(step, e.every_steps) or step == plan.stop_step]
      evaluated = run_evaluators(due, state, step, workdir, writer)
      results.update(evaluated)
      if best is not None:
        best.update(step, state, evaluated, saved_config)
      preempted = preemption.reached(step)
      if (preempted or every(step, config.checkpoint_every_steps)
          or step == plan.stop_step):
        if previous is not None:  # never save a state whose step was not checked
          checked(step, step_metrics)
          previous = None
        ckpt.save(step, state, saved_config, force=True)
      if preempted and preemption.interrupted:
        message = f"interrupted at step {step}, saved; run the same command to continue"
        log.warning("%s", message)
        raise KeyboardInterrupt(message)
      if preempted:
        log.warning("preempted (SIGTERM): saved step %d, exiting", step)
        break
    if step == plan.stop_step:
      write_results(workdir, step, results)
    if is_main and step > first_step:
      log_summary(workdir, first_step, step, time.perf_counter() - start, losses,
                  ckpt.latest_step())
  finally:
    tracer.close()
    preemption.close()
    writer.close()
    ckpt.close()
    if best is not None:
      best.close()
  return state


def run_evaluators(evaluators: list[evals.Evaluator], state: State, step: int, workdir: str,
                   writer: metrics_lib.MetricWriter) -> dict[str, float]:
  """Runs each evaluator, logs and writes its scalars as `name/key`; returns them all."""
  results = {}
  for evaluator in evaluators:
    out = {f"{evaluator.name}/{k}": v
           for k, v in evaluator.run(state, step, workdir, writer).items()}
    if out:
      log.info("step %d %s", step, " ".join(f"{k} {v:.4g}" for k, v in out.items()))
      writer.scalars(step, out)
      results.update(out)
  return results


def write_results(workdir: str, step: int, results: dict[str, float]) -> None:
  """Process 0 writes the final evaluation scalars to WORKDIR/results.json."""
  if results and jax.process_index() == 0:
    (storage.path(workdir) / "results.json").write_text(
        json.dumps({"step": step, **results}, indent=2))


def log_summary(workdir: str, first_step: int, step: int, seconds: float,
                losses: dict[int, float], checkpoint_step: int | None) -> None:
  """The end of a run: one line of what happened, then where everything went."""
  first, last = min(losses, default=None), max(losses, default=None)
  loss = (f"; loss {losses[first]:.4f} (step {first}) -> {losses[last]:.4f} (step {last})"
          if losses else "")
  log.info("trained steps %d -> %d in %s%s", first_step, step, metrics_lib.hms(seconds), loss)
  workdir = storage.path(workdir)
  log.info("checkpoint: %s", workdir / checkpointing.CHECKPOINTS / str(checkpoint_step))
  log.info("metrics: %s", workdir / "metrics.jsonl")
  log.info("tensorboard --logdir %s", workdir / "tensorboard")
  if (workdir / "reconstructions").exists():
    log.info("reconstructions: %s", workdir / "reconstructions")


def start_from(task: tasks.Task, tx, state: State, loaded, shardings, mesh) -> State:
  """The initial state with `config.init_from`'s weights put in (fresh optimizer state).

  Built inside one jitted function whose outputs have the state's shardings: every host
  gives the loaded weights as host arrays (each host read the same file), each device
  takes its part, and nothing moves between hosts (no cross-host `device_put`, which
  multi-host backends refuse). Leaves that are not arrays (names, configs) stay static.
  """
  leaves, treedef = jax.tree.flatten(loaded)
  at = [i for i, x in enumerate(leaves) if isinstance(x, (np.ndarray, jax.Array))]
  replicated = sharding.replicated(mesh)
  hosts = [np.asarray(leaves[i]) for i in at]
  arrays = [jax.make_array_from_callback(h.shape, replicated, lambda idx, h=h: h[idx])
            for h in hosts]

  def build(state: State, arrays: list[jax.Array]) -> State:
    full = list(leaves)
    for i, array in zip(at, arrays):
      full[i] = array
    params, model_state = task.apply_init(jax.tree.unflatten(treedef, full), state["params"],
                                          state.get("model_state", {}))
    new = {"step": state["step"], "params": params, "opt_state": tx.init(params)}
    if "model_state" in state:
      new["model_state"] = model_state
    return new
  return jax.jit(build, out_shardings=shardings, donate_argnums=0)(state, arrays)
