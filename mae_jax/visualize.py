"""Reconstruction grids: original | masked | reconstructions | reconstruction + visible,
with column titles, upscaled for display."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

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


def display_scale(size: int, target: int = 192) -> int:
  """The integer upscaling that shows a `size`-pixel image at about `target` pixels."""
  return max(1, round(target / size))


def grid_image(columns: Sequence[np.ndarray], titles: Sequence[str], scale: int = 1,
               pad: int = 2) -> np.ndarray:
  """Titled columns of images -> one uint8 [H', W', C] image, a row per example.

  columns: each [B, H, W, C] uint8, upscaled `scale` times (nearest neighbour, so patch
  edges stay sharp); titles: one per column, written above it (PIL's default font).
  """
  if len(columns) != len(titles):
    raise ValueError(f"{len(columns)} columns but {len(titles)} titles")
  b, h, w, c = columns[0].shape
  h, w = h * scale, w * scale
  title_h = 16
  canvas = np.full((title_h + b * (h + pad) + pad, len(columns) * (w + pad) + pad, c), 255,
                   np.uint8)
  for j, column in enumerate(columns):
    big = column.repeat(scale, axis=1).repeat(scale, axis=2)  # [B, h, w, C]
    x = pad + j * (w + pad)
    for i in range(b):
      y = title_h + pad + i * (h + pad)
      canvas[y:y + h, x:x + w] = big[i]
  image = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
  draw = ImageDraw.Draw(image)
  for j, title in enumerate(titles):
    draw.text((pad + j * (w + pad) + 2, 2), title, fill=0 if c == 1 else (0,) * c)
  return np.asarray(image).reshape(canvas.shape)


def save_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
