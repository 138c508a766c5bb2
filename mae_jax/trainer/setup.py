"""A run's plan (step counts, lr) and the checks that decide whether a workdir may resume."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
import optax

from mae_jax import optim
from mae_jax.config import COMPUTE_FIELDS
from mae_jax.tasks.base import Task, field_diff


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


# Config fields a resumed run may change: where the data lives and how it is read, how the
# model computes (the float32 weights are the same), how the step is laid out over hosts and
# devices, what is logged, traced, saved and evaluated, where compiled programs are
# cached, and where this invocation stops. A prefix ('evals') frees every field below it.
# Every other field of the config must keep its saved value: a new hyperparameter is covered
# without being listed anywhere.
# normalize_on_device only moves the normalise (host and device agree to 1e-6).
# grad_accum_steps changes how the global batch is split, not the update (MAE's masks are
# drawn for the whole batch); per-micro-batch randomness (drop path) is drawn anew.
FREE_FIELDS = (
    "input.data_dir", "input.eval_split", "input.worker_count", "input.worker_buffer_size",
    "input.read_threads", "input.read_buffer", "input.normalize_on_device",
    *(f"model.{k}" for k in COMPUTE_FIELDS),
    "fsdp", "num_slices", "grad_accum_steps", "stop_at_step", "eval_only", "evals",
    "best_metric", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "compilation_cache_dir", "profile",
)


def is_free(field: str) -> bool:
  """True for a dotted config field (or one below a prefix) in FREE_FIELDS."""
  return any(field == f or field.startswith(f + ".") for f in FREE_FIELDS)


def flat_fields(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'input': {'seed': 0}} -> {'input.seed': 0}, JSON-normalised (tuples are lists)."""
  out = {}
  for k, v in json.loads(json.dumps(tree)).items():
    if isinstance(v, dict) and v:
      out.update(flat_fields(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run_signature(config: ml_collections.ConfigDict, plan: Plan, num_records: int
                  ) -> dict[str, Any]:
  """What the config derives for the run, beside its own fields: the step counts and peak
  lr (they depend on the dataset's size) and the number of training records (the sample
  sequence is a permutation of them). JSON-normalised, as stored with each checkpoint."""
  return json.loads(json.dumps({
      "batch_size": config.batch_size, "total_steps": plan.total_steps,
      "warmup_steps": plan.warmup_steps, "peak_lr": plan.peak_lr,
      "train_records": num_records}))


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
  return field_diff(saved_model, task.model_dict(), free=COMPUTE_FIELDS)


def config_diff(saved: dict[str, Any], config: ml_collections.ConfigDict
                ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, config)} for every dotted field of both configs that differs, except
  the FREE_FIELDS and the model (compared by `model_diff`). A field only one side has (a
  checkpoint from before the field existed) is not compared."""
  old = flat_fields(saved)
  new = flat_fields(json.loads(config.to_json_best_effort()))
  return {k: (old[k], v) for k, v in new.items()
          if k in old and old[k] != v and not is_free(k) and not k.startswith("model.")}


def check_resumable(workdir: str, saved: dict[str, Any], task: Task, run: dict[str, Any],
                    plan: Plan, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a checkpoint of another task, model or run, naming the fields.

  Every config field is compared except the FREE_FIELDS (process and device counts are no
  field: a run resumes on any layout). An evaluation (`eval_only`) trains nothing and
  saves no checkpoint, so it only needs the same task and model. Checkpoints written
  before tasks existed are pretraining checkpoints.
  """
  saved_task = saved.get("task", "pretrain")
  if saved_task != task.name:
    raise ValueError(f"{workdir} holds a checkpoint of task {saved_task!r}, not "
                     f"{task.name!r}: use a new workdir")
  diff = model_diff(task, saved["model"])
  if diff:
    raise ValueError(f"{workdir} holds a checkpoint of another model; (saved, config): "
                     f"{diff}. Use a new workdir or the saved model config")
  if config.get("eval_only"):
    return
  diff = config_diff(saved.get("config", {}), config)
  diff.update({k: (v, run[k]) for k, v in saved["run"].items() if k in run and run[k] != v})
  if diff:
    raise ValueError(f"{workdir} holds a checkpoint of a run with other settings; "
                     f"(saved, config): {diff}. Resuming would not continue that run: use a "
                     f"new workdir or the saved settings")
  if saved["step"] > plan.stop_step:
    raise ValueError(f"{workdir} is at step {saved['step']}, past the requested stop at step "
                     f"{plan.stop_step}")
