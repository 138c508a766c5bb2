"""Orbax checkpoints: standalone parameter checkpoints and the training CheckpointManager.

Two layouts, both readable by `load_params` (and so by `mae_jax.load_pretrained`):
  * a params checkpoint (written by `save_params`, e.g. by `python -m mae_jax.convert`):
      DIR/params  (the {'encoder', 'decoder'} pytree)   DIR/config  (JSON: model config)
  * a training workdir: WORKDIR/checkpoints/<step>/{state, data, config}, written by
    `CheckpointManager` during pretraining; `state` holds step, params and optimizer state.
Restores go against an abstract target built from the saved model config, so arrays come
back with their saved shapes and dtypes, and optimizer states keep their structure.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mae_jax.config import FIELDS, ModelConfig
from mae_jax.mae import Params, init_params

CHECKPOINTS = "checkpoints"


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
  unknown = sorted(set(d) - set(FIELDS))
  if unknown:
    raise ValueError(f"checkpoint model config has unknown field(s) {unknown}")
  return ModelConfig(**d)


def abstract_params(config: ModelConfig, encoder_only: bool = False) -> Params:
  """ShapeDtypeStructs of the parameters of `config`, without allocating them."""
  shapes = jax.eval_shape(init_params, config, jax.random.key(0))
  return {"encoder": shapes["encoder"]} if encoder_only else shapes


def save_params(path: str, params: Params, config: ModelConfig) -> None:
  """Writes a standalone Orbax params checkpoint; refuses to overwrite an existing one."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; refusing to overwrite it")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave({"model": config.to_dict(),
                                  "encoder_only": "decoder" not in params})))


def latest_step_dir(path: str) -> str:
  """A workdir or its checkpoints/ folder -> the newest finished step directory."""
  root = os.path.join(path, CHECKPOINTS) if os.path.isdir(os.path.join(path, CHECKPOINTS)) \
      else path
  steps = [int(n) for n in os.listdir(root) if n.isdigit()]
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint under {root}")
  return os.path.join(root, str(max(steps)))


def is_orbax_dir(path: str) -> bool:
  """True for a params checkpoint, a training step directory, or a training workdir."""
  if not os.path.isdir(path):
    return False
  if os.path.isdir(os.path.join(path, "config")):
    return True
  for root in (os.path.join(path, CHECKPOINTS), path):
    if os.path.isdir(root) and any(n.isdigit() for n in os.listdir(root)):
      return True
  return False


def load_params(path: str) -> tuple[Params, ModelConfig]:
  """Reads (params, config) from a params checkpoint, a training step dir or a workdir."""
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "config")):
    path = latest_step_dir(path)
  with open(os.path.join(path, "config", "metadata")) as f:
    meta = json.load(f)
  config = config_from_dict(meta["model"])
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    if os.path.isdir(os.path.join(path, "params")):
      target = abstract_params(config, meta.get("encoder_only", False))
      restored = ckptr.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore(target)))
      return restored["params"], config
    # A training step: restore only the params out of the full train state.
    target = {"params": abstract_params(config)}
    restored = ckptr.restore(path, ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, partial_restore=True)))
    return restored["state"]["params"], config
