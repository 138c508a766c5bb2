"""Reconstruction grids of fixed held-out images: original | masked | reconstruction | + visible."""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mae_jax import sharding, visualize
from mae_jax.config import ModelConfig
from mae_jax.data import pipeline
from mae_jax.mae import MAEOutput, forward
from mae_jax.metrics import MetricWriter


def make_reconstruct(model: ModelConfig, mesh: Mesh, seed: int = 0):
  """Jitted `(params, images) -> MAEOutput` with the same masks every time, replicated
  over the mesh, so every process takes part and process 0 can read the result."""
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def run(params, images):
    noise = jax.random.uniform(jax.random.key(seed), (images.shape[0], model.num_patches))
    return forward(params, images, None, model, noise)
  return lambda params, images: run(params, jax.device_put(images, replicated))


class ReconstructionEvaluator:
  """PNG grids of the same `num_images` evaluation images, with the same masks every time,
  in WORKDIR/reconstructions/step_<step>.png and in TensorBoard (MAE pretraining only)."""

  def __init__(self, name: str, config: ml_collections.ConfigDict, task: Any, mesh: Mesh,
               every_steps: int = 0, num_images: int = 8):
    if not isinstance(getattr(task, "model", None), ModelConfig):
      raise ValueError(f"config.evals.{name}: reconstructions need an MAE (task 'pretrain'), "
                       f"not task {task.name!r}")
    self.name, self.every_steps = name, every_steps
    self.model = task.model
    self.input = config.input
    self.images = pipeline.make_eval_batch(config.input, image_size=self.model.image_size,
                                           num_images=num_images)
    self.reconstruct = make_reconstruct(self.model, mesh)

  def run(self, state: dict[str, Any], step: int, workdir: str,
          writer: MetricWriter) -> dict[str, float]:
    out = self.reconstruct(state["params"], self.images)
    if jax.process_index() == 0:
      write_grid(workdir, step, out, self.images, self.model, self.input, writer)
    return {}


def write_grid(workdir: str, step: int, out: MAEOutput, images: np.ndarray, model: ModelConfig,
               input_config: ml_collections.ConfigDict, writer: MetricWriter) -> None:
  """Writes the reconstruction grid of `out` as a PNG and to TensorBoard."""
  panels = visualize.reconstruction_panels(images, jax.device_get(out), model,
                                           tuple(input_config.mean), tuple(input_config.std))
  grid = visualize.grid_image(panels)
  os.makedirs(os.path.join(workdir, "reconstructions"), exist_ok=True)
  visualize.save_png(os.path.join(workdir, "reconstructions", f"step_{step:08d}.png"), grid)
  writer.image(step, "reconstructions", grid)
