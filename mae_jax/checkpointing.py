"""Orbax checkpoints: standalone parameter checkpoints and the training CheckpointManager.

Two layouts, both readable by `load_params` (and so by `mae_jax.load_pretrained`):
  * a params checkpoint (written by `save_params`, e.g. by `python -m mae_jax.convert`):
      DIR/params  (the {'encoder', 'decoder'} pytree)   DIR/config  (JSON: model config)
  * a training workdir: WORKDIR/checkpoints/<step>/{state, config}, written by
    `CheckpointManager` during training; `state` holds step, params and optimizer state
    (and the model state of tasks that have one). The data position is the step itself
    (one global batch per step, `pipeline.make_train_loader`); checkpoints written before
    that also hold a `data` item (grain's iterator state), which is not read.
Restores go against an abstract target built from the saved model config, so arrays come
back with their saved shapes and dtypes, and optimizer states keep their structure.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from mae_jax import storage
from mae_jax.config import ModelConfig, config_from_dict
from mae_jax.mae import Params, init_params

CHECKPOINTS = "checkpoints"


def abstract_params(config: ModelConfig, encoder_only: bool = False) -> Params:
  """ShapeDtypeStructs of the parameters of `config` on this process's first device.

  The target carries a sharding so a checkpoint written on any topology (a pod, several
  hosts) restores here; no weights are allocated.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(init_params, config, jax.random.key(0))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        shapes)
  return {"encoder": shapes["encoder"]} if encoder_only else shapes


def save_params(path: str, params: Params, config: ModelConfig) -> None:
  """Writes a standalone Orbax params checkpoint; refuses to overwrite an existing one."""
  path = storage.path(path)
  if path.exists():
    raise FileExistsError(f"{path} exists; refusing to overwrite it")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave({"model": config.to_dict(),
                                  "encoder_only": "decoder" not in params})))


def _steps(root: epath.Path) -> list[int]:
  """Finished steps under a checkpoints folder: Orbax renames a step dir when it commits on
  a disk, and marks it with a commit file in a bucket (where renaming is not atomic)."""
  if not root.is_dir():
    return []
  return [int(p.name) for p in root.iterdir()
          if p.name.isdigit() and ocp.path.step.is_path_finalized(p)]


def latest_step_dir(path: str | epath.Path) -> epath.Path:
  """A workdir or its checkpoints/ folder -> the newest finished step directory."""
  path = storage.path(path)
  root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
  steps = _steps(root)
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint under {root}")
  return root / str(max(steps))


def is_orbax_dir(path: str | epath.Path) -> bool:
  """True for a params checkpoint, a training step directory, or a training workdir."""
  path = storage.path(path)
  if not path.is_dir():
    return False
  if (path / "config").is_dir():
    return True
  return bool(_steps(path / CHECKPOINTS) or _steps(path))


def load_params(path: str | epath.Path) -> tuple[Params, ModelConfig]:
  """Reads (params, config) from a params checkpoint, a training step dir or a workdir."""
  path = storage.path(path)
  if not (path / "config").is_dir():
    path = latest_step_dir(path)
  meta = json.loads((path / "config" / "metadata").read_text())
  task = meta.get("task", "pretrain")  # checkpoints from before tasks existed are MAEs
  if task != "pretrain":
    raise ValueError(f"{path} is a checkpoint of task {task!r}, not an MAE (pretraining) "
                     "checkpoint")
  config = config_from_dict(meta["model"])
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    if (path / "params").is_dir():
      target = abstract_params(config, meta.get("encoder_only", False))
      restored = ckptr.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore(target)))
      return restored["params"], config
    # A training step: restore only the params out of the full train state.
    target = {"params": abstract_params(config)}
    restored = ckptr.restore(path, ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    return restored["state"]["params"], config


def _step_dir(path: str | epath.Path) -> epath.Path:
  path = storage.path(path)
  return path if (path / "config").is_dir() else latest_step_dir(path)


def saved_meta(path: str) -> dict[str, Any] | None:
  """The JSON saved with an mae_jax checkpoint (a step dir, or the newest step of a workdir
  or of a folder of steps such as WORKDIR/best); None for anything else."""
  if not is_orbax_dir(path):
    return None
  return json.loads((_step_dir(path) / "config" / "metadata").read_text())


def read_task_params(path: str, target: Params, item: str = "params") -> Params:
  """The params (or another `item` of the train state, e.g. 'model_state') of a training step
  (as `saved_meta` finds it); `target`: their abstract shapes (the task's model)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {item: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(_step_dir(path), ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  return restored["state"][item]


def read_saved_run(workdir: str) -> dict[str, Any] | None:
  """The JSON saved with the newest checkpoint of a workdir plus its `step`, or None."""
  if not _steps(storage.path(workdir) / CHECKPOINTS):
    return None
  step_dir = latest_step_dir(workdir)
  return {**json.loads((step_dir / "config" / "metadata").read_text()),
          "step": int(step_dir.name)}


class TrainCheckpointer:
  """Orbax CheckpointManager for training: train state and config.

  Saves asynchronously when asked (the loop decides when) and keeps the newest `keep`.
  Restores against an abstract state carrying the target shardings, so a resumed run gets
  arrays laid out as the current mesh wants them, whatever layout wrote them.
  """

  def __init__(self, workdir: str, *, keep: int):
    self.manager = ocp.CheckpointManager(
        storage.path(workdir) / CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state) -> Any:
    """The newest step's train state, laid out as `abstract_state`'s shardings say."""
    step = self.manager.latest_step()
    if (self.manager.directory / str(step) / "data").exists():
      logging.getLogger(__name__).warning(
          "step %d was saved before the data order became a function of the global "
          "position: the run continues with global batch %d of the new order (the same "
          "recipe; other records than the old order would have given)", step, step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def save(self, step: int, state, config: dict[str, Any], force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config)), force=force)

  def close(self) -> None:
    """Waits for async saves to land, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


BEST = "best"


class BestCheckpointer:
  """Keeps the train state of the step with the highest `metric` in WORKDIR/best/<step>/
  (state, config with the value), besides the newest ones in checkpoints/.

  Saves only on a new best, so a resumed run (which re-evaluates the same steps to the same
  values) never replaces it with an equal one.
  """

  def __init__(self, workdir: str, metric: str):
    self.metric = metric
    self.manager = ocp.CheckpointManager(
        storage.path(workdir) / BEST,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    step = self.manager.latest_step()
    self.value = None if step is None else self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]["best"][metric]

  def update(self, step: int, state, results: dict[str, float], config: dict[str, Any]
             ) -> None:
    """Saves `state` if `results` holds the metric and it beats the best so far."""
    value = results.get(self.metric)
    if value is None or (self.value is not None and value <= self.value):
      return
    self.value = value
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave({**config, "best": {self.metric: value, "step": step}})),
        force=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
