"""Reconstruction grids: original | masked | reconstructions | reconstruction + visible,
with column titles, upscaled for display.

Also a command: `python -m mae_jax.visualize SRC OUT.png --images DIR` (or `--dataset`; SRC a
workdir: by default its run's own evaluation images and normalisation).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
from typing import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from mae_jax import storage
from mae_jax.config import ModelConfig
from mae_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.mae import MAEOutput, mae_apply
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


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] image as a PNG file, locally or in a bucket (gs://)."""
  with storage.path(path).open("wb") as f:
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(f, format="PNG")


def load_images(folder: str, image_size: int, num_images: int, mean: tuple[float, ...],
                std: tuple[float, ...]) -> np.ndarray:
  """The first `num_images` image files of `folder` (sorted by name), as the evaluation
  view: shorter side resized to `image_size` (bicubic), centre crop, normalised."""
  from mae_jax.data import sources, transforms
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(sources.IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"{folder} holds no image files ({', '.join(sources.IMAGE_EXTENSIONS)})")
  crop, normalize = transforms.ResizeCenterCrop(image_size), transforms.Normalize(mean, std)
  images = []
  for name in names[:num_images]:
    with open(os.path.join(folder, name), "rb") as f:
      image = transforms.decode_rgb(f.read())
    images.append(normalize.map(crop.map({"image": image}))["image"])
  return np.stack(images)


def workdir_input(src: str) -> dict | None:
  """The input config of the run in workdir `src` (its WORKDIR/config.json); None for
  anything else (a checkpoint, a .pth, a Hugging Face directory)."""
  config = storage.path(src) / "config.json"
  if not storage.path(src).is_dir() or not config.exists():
    return None
  return json.loads(config.read_text()).get("input")


def main(argv: list[str] | None = None) -> int:
  """`python -m mae_jax.visualize SRC OUT.png`: a reconstruction grid of SRC's MAE."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.visualize",
      description="Write a PNG grid (original | masked | reconstruction | reconstruction with "
                  "the visible patches pasted back) of an MAE's reconstructions.")
  parser.add_argument("src", help="an mae_jax workdir or params checkpoint, an official .pth "
                                  "with decoder, or a Hugging Face ViTMAE directory")
  parser.add_argument("out", help="PNG to write (never overwritten)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--images", help="a folder of image files")
  source.add_argument("--dataset", help="a dataset as in config.input.dataset (tfds name, "
                                        "'folder', 'demo', 'digits'); default for a workdir: "
                                        "its run's")
  parser.add_argument("--split", help="the dataset's split (default: its evaluation split)")
  parser.add_argument("--data_dir", help="the dataset's data_dir (tfds) or root (folder)")
  parser.add_argument("--num_images", type=int, default=8)
  parser.add_argument("--mask_ratio", type=float, help="default: the model's own")
  parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
  parser.add_argument("--mean", type=float, nargs=3,
                      help="pixel normalisation (default: a workdir's run's, else ImageNet's)")
  parser.add_argument("--std", type=float, nargs=3)
  args = parser.parse_args(argv)
  try:
    if os.path.exists(args.out):
      raise FileExistsError(f"{args.out} exists; refusing to overwrite it")
    if args.num_images < 1:
      raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
    saved = workdir_input(args.src) or {}
    if not (args.images or args.dataset or saved.get("dataset")):
      raise ValueError(f"which images? --images DIR or --dataset NAME ({args.src} is not a "
                       "workdir whose config names its dataset)")
    from mae_jax.convert import load_pretrained
    params, config = load_pretrained(args.src)
    if "decoder" not in params:
      raise ValueError(f"{args.src} holds no decoder (an encoder-only checkpoint): it cannot "
                       "reconstruct")
    if args.mask_ratio is not None:
      config = dataclasses.replace(config, mask_ratio=args.mask_ratio)
    mean = tuple(args.mean or saved.get("mean", IMAGENET_MEAN))
    std = tuple(args.std or saved.get("std", IMAGENET_STD))
    if args.images:
      images = load_images(args.images, config.image_size, args.num_images, mean, std)
    else:
      from mae_jax.data import pipeline
      given = {"data_dir": args.data_dir, "eval_split": args.split}
      if args.dataset:
        input_config = {"dataset": args.dataset, **given}
      else:  # the run's own input: its dataset, data_dir, split..., unless given here
        input_config = {**saved, **{k: v for k, v in given.items() if v is not None}}
      input_config.update(mean=mean, std=std)
      images = pipeline.make_eval_batch(argparse.Namespace(**input_config),
                                        image_size=config.image_size,
                                        num_images=args.num_images)
  except (ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError) as e:
    parser.exit(1, f"error: {e}\n")
  noise = jax.random.uniform(jax.random.key(args.seed), (len(images), config.num_patches))
  out = mae_apply(params, images, config=config, noise=noise)
  panels = reconstruction_panels(images, jax.device_get(out), config, mean, std)
  titles = ["original", f"masked {config.mask_ratio:.0%}", "reconstruction",
            "reconstruction + visible"]
  grid = grid_image([panels[:, i] for i in range(4)], titles,
                    display_scale(config.image_size))
  save_png(args.out, grid)
  print(f"wrote {args.out}: {len(images)} images, mask ratio {config.mask_ratio}, "
        f"{grid.shape[1]}x{grid.shape[0]} px")
  return 0


if __name__ == "__main__":
  sys.exit(main())
