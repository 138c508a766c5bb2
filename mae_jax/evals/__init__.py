"""Evaluators declared in the config, as big_vision does it:

    config.evals.<name> = dict(type='reconstruction' | 'knn' | 'classification',
                               every_steps=N, ...)

Each runs every `every_steps` steps and at the last step of a run (0: only at the end;
negative: never, e.g. `--config.evals.reconstruction.every_steps=-1`).
They are built before anything is written, so a missing split or a bad field fails first.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import ml_collections
from jax.sharding import Mesh

from mae_jax.evals.classification import ClassificationEvaluator
from mae_jax.evals.knn import KnnEvaluator
from mae_jax.evals.reconstruction import ReconstructionEvaluator
from mae_jax.metrics import MetricWriter


class Evaluator(Protocol):
  name: str
  every_steps: int

  def run(self, state: dict[str, Any], step: int, workdir: str,
          writer: MetricWriter) -> dict[str, float]:
    """Evaluates the train state; returns scalars (the loop logs them as `name/key`)."""

  # Optional: `start(state, step, workdir)`, called once before the first step of a run
  # (e.g. to keep the untrained model's output for before/after comparisons).


TYPES = {"reconstruction": ReconstructionEvaluator, "knn": KnnEvaluator,
         "classification": ClassificationEvaluator}


def make_evaluators(config: ml_collections.ConfigDict, task, mesh: Mesh) -> list[Evaluator]:
  out = []
  for name, spec in sorted(config.get("evals", {}).items()):
    spec = dict(spec)
    kind = spec.pop("type", None)
    if spec.get("every_steps", 0) < 0:
      continue
    if kind not in TYPES:
      raise ValueError(f"config.evals.{name}: type must be one of {sorted(TYPES)}, got {kind!r}")
    fields = list(inspect.signature(TYPES[kind]).parameters)[4:]  # after name, config, task, mesh
    unknown = sorted(set(spec) - set(fields))
    if unknown:
      raise ValueError(f"config.evals.{name} ({kind}): unknown field(s) {unknown}; fields: "
                       f"type, {', '.join(fields)}")
    out.append(TYPES[kind](name, config, task, mesh, **spec))
  return out


__all__ = ["Evaluator", "TYPES", "make_evaluators"]
