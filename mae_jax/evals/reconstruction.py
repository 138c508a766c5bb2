"""Reconstruction grids of fixed held-out images: original | masked | output at the start of
the run | output now | output now + visible."""
from __future__ import annotations

import functools
import io
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from mae_jax import sharding, storage, visualize
from mae_jax.config import ModelConfig
from mae_jax.data import pipeline
from mae_jax.mae import forward
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


START_OUTPUTS = "output_step_0.npy"  # in WORKDIR/reconstructions: the step-0 column


class ReconstructionEvaluator:
  """PNG grids of the same `num_images` evaluation images, with the same masks every time,
  in WORKDIR/reconstructions/step_<step>.png and in TensorBoard (MAE pretraining only).

  Each grid shows the reconstructions of step 0 (the untrained model) next to the current
  ones, upscaled for display. A run saves its step-0 outputs in
  WORKDIR/reconstructions/output_step_0.npy, so that resumed runs show them too; resumed from a
  workdir without them (or with other images), the column shows the resumed step and says so.
  """

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
    # (step, outputs uint8 [B, H, W, C]) of the earliest model at hand: step 0's if kept
    self.first: tuple[int, np.ndarray] | None = None

  def start(self, state: dict[str, Any], step: int, workdir: str) -> None:
    """Keeps the outputs at step 0 (saved by a fresh run, read back by a resumed one), else
    those of the starting model, shown next to every later grid."""
    outputs = self.panels(state)[:, 2]  # every process takes part
    if jax.process_index() != 0:
      return
    path = storage.path(workdir) / "reconstructions" / START_OUTPUTS
    if step == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      buffer = io.BytesIO()
      np.save(buffer, outputs)
      path.write_bytes(buffer.getvalue())
    elif path.exists():
      saved = np.load(io.BytesIO(path.read_bytes()))
      if saved.shape == outputs.shape:  # the same eval images (`num_images`, image size)
        step, outputs = 0, saved
    self.first = (step, outputs)

  def panels(self, state: dict[str, Any]) -> np.ndarray:
    """uint8 [B, 4, H, W, C] (see visualize.reconstruction_panels); on every process."""
    out = jax.device_get(self.reconstruct(state["params"], self.images))
    return visualize.reconstruction_panels(self.images, out, self.model,
                                           tuple(self.input.mean), tuple(self.input.std))

  def run(self, state: dict[str, Any], step: int, workdir: str,
          writer: MetricWriter) -> dict[str, float]:
    panels = self.panels(state)
    if jax.process_index() == 0:
      first_step, first = self.first or (step, panels[:, 2])
      write_grid(workdir, step, panels, first_step, first, self.model.mask_ratio, writer)
    return {}


def write_grid(workdir: str, step: int, panels: np.ndarray, first_step: int,
               first: np.ndarray, mask_ratio: float, writer: MetricWriter) -> epath.Path:
  """Writes original | masked | reconstruction at `first_step` (`first`, [B, H, W, C]) and at
  `step` | the latter pasted into the visible patches, as a PNG and to TensorBoard; returns
  the PNG's path."""
  columns = [panels[:, 0], panels[:, 1], first, panels[:, 2], panels[:, 3]]
  titles = ["original", f"masked {mask_ratio:.0%}", f"output, step {first_step}",
            f"output, step {step}", "output + visible"]
  grid = visualize.grid_image(columns, titles, visualize.display_scale(panels.shape[2]))
  path = storage.path(workdir) / "reconstructions" / f"step_{step:08d}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  visualize.save_png(path, grid)
  writer.image(step, "reconstructions", grid)
  logging.getLogger(__name__).info("reconstructions: %s", path)
  return path
