"""Reconstruction grids: original | masked | reconstruction | reconstruction + visible."""
from __future__ import annotations

import numpy as np
from PIL import Image

from mae_jax.config import ModelConfig
from mae_jax.mae import MAEOutput
from mae_jax.patches import patchify, unpatchify


def reconstruction_panels(images: np.ndarray, out: MAEOutput, config: ModelConfig,
                          mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """uint8 [B, 4, H, W, C]: the four panels per image, in pixel space.

  images: [B, H, W, C] normalised inputs. With `norm_pix_loss` the prediction lives in
  per-patch normalised space; it is mapped back with each target patch's own mean and
  variance (the usual way to show such models; the statistics come from the true patch).
  """
  p = config.patch_size
  patches = np.asarray(patchify(images, p), np.float32)  # [B, N, P]
  pred = np.asarray(out.pred, np.float32)
  if config.norm_pix_loss:
    mu = patches.mean(-1, keepdims=True)
    sd = np.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * sd + mu
  mask = np.asarray(out.mask, np.float32)[..., None]  # [B, N, 1], 1 = removed
  masked = patches * (1 - mask)
  pasted = patches * (1 - mask) + pred * mask
  grid = (config.grid_size, config.grid_size)
  panels = [np.asarray(unpatchify(x, p, grid)) for x in (patches, masked, pred, pasted)]
  pixels = np.stack(panels, axis=1) * np.asarray(std) + np.asarray(mean)  # [B, 4, H, W, C]
  removed = np.asarray(unpatchify(np.broadcast_to(mask, patches.shape), p, grid)) > 0
  pixels[:, 1] = np.where(removed, 0.5, pixels[:, 1])  # removed patches shown grey
  return np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)


def grid_image(panels: np.ndarray, pad: int = 2) -> np.ndarray:
  """[B, 4, H, W, C] uint8 -> one [B*(H+pad), 4*(W+pad), C] image, a row per example."""
  b, k, h, w, c = panels.shape
  canvas = np.full((b * (h + pad) + pad, k * (w + pad) + pad, c), 255, np.uint8)
  for i in range(b):
    for j in range(k):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      canvas[y:y + h, x:x + w] = panels[i, j]
  return canvas


def save_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
