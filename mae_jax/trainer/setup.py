"""A run's plan (step counts, lr) and the checks that decide whether a workdir may resume."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import optax

from mae_jax import optim
from mae_jax.config import COMPUTE_FIELDS
from mae_jax.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Plan:
  """Step counts of a run, derived from the config and the dataset size."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  stop_step: int  # this invocation stops here (== total_steps unless config.stop_at_step)
  peak_lr: float


def plan_run(config: ml_collections.ConfigDict, num_examples: int) -> Plan:
  """Epochs -> steps (unless total/warmup steps are set), and the peak lr:
  `config.lr` if set, else base_lr x batch / 256 (the linear scaling rule)."""
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


def plan_and_optimizer(config: ml_collections.ConfigDict, task: Task, num_examples: int
                       ) -> tuple[Plan, optax.Schedule, optax.GradientTransformation]:
  """What a run trains with for a dataset of `num_examples`: its plan and the task's (lr
  schedule, optimizer) for that plan. The loop's only source of both, so a config's recipe
  (epochs -> steps, lr, betas, weight decay) can be read off without running it."""
  plan = plan_run(config, num_examples)
  schedule, tx = task.optimizer(plan.peak_lr, plan.warmup_steps, plan.total_steps)
  return plan, schedule, tx


# Input settings a resumed run may change: where the data lives and how it is read.
# normalize_on_device only moves the normalise (host and device agree to 1e-6), so runs
# checkpointed before the option resume with it on or off.
FREE_INPUT_FIELDS = ("data_dir", "eval_split", "worker_count", "worker_buffer_size",
                     "read_threads", "read_buffer", "normalize_on_device")


def run_signature(config: ml_collections.ConfigDict, plan: Plan, task: Task) -> dict[str, Any]:
  """What a resumed run must share with the run that wrote the checkpoint: the data order
  and augmentation, the hosts, the masks and the optimisation (the model is compared
  separately). JSON-normalised, as it is stored with each checkpoint."""
  inputs = {k: v for k, v in config.input.to_dict().items() if k not in FREE_INPUT_FIELDS}
  if not inputs.get("draft_decode", True):  # off: as checkpoints from before the option
    del inputs["draft_decode"]
  return json.loads(json.dumps({
      "batch_size": config.batch_size, "seed": config.seed, "input": inputs,
      "process_count": jax.process_count(), "total_steps": plan.total_steps,
      "warmup_steps": plan.warmup_steps, "peak_lr": plan.peak_lr,
      **{k: config[k] for k in task.run_fields()}}))


def checkpoint_config(task: Task, run: dict[str, Any],
                      config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The JSON saved with every checkpoint: the task, its model, the run signature and, for a
  classifier, the names of its classes (which exports label their outputs with)."""
  names = task.class_names()
  return {"task": task.name, "model": task.model_dict(), "run": run,
          "config": json.loads(config.to_json_best_effort()),
          **({"class_names": names} if names else {})}


def model_diff(task: Task, saved_model: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, config)} where a checkpoint's saved model differs from the task's (the
  COMPUTE_FIELDS, dtype and attention kernel, may differ: the weights are the same)."""
  model = json.loads(json.dumps(task.model_dict()))
  return {k: (v, model.get(k)) for k, v in saved_model.items()
          if model.get(k) != v and k not in COMPUTE_FIELDS}


def check_resumable(workdir: str, saved: dict[str, Any], task: Task, run: dict[str, Any],
                    plan: Plan) -> None:
  """Refuses to resume a checkpoint of another task, model or run, naming the fields.

  The activation dtype and the attention kernel may change (the parameters are the same
  either way). Checkpoints written before tasks existed are pretraining checkpoints.
  """
  saved_task = saved.get("task", "pretrain")
  if saved_task != task.name:
    raise ValueError(f"{workdir} holds a checkpoint of task {saved_task!r}, not "
                     f"{task.name!r}: use a new workdir")
  diff = model_diff(task, saved["model"])
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
