"""The preprocessing an exported model needs: mae_jax's evaluation view, in others' words.

mae_jax evaluates on the reference's view (`pipeline.make_eval_loader`): the shorter side
resized to int(image_size / 0.875) with PIL's bicubic filter, a centre crop of image_size, then
`(x / 255 - mean) / std` with the run's mean and std. Written here as
  * a Hugging Face image processor (preprocessor_config.json): CLIPImageProcessor's steps are
    exactly these (resize the shortest edge, centre crop, rescale, normalise; PIL bicubic), so
    `AutoImageProcessor` and `pipeline('image-classification')` see the same pixels. One
    difference: where the resized image exceeds the crop by 3 mod 4 pixels, transformers
    floors the centre offset that torchvision (and mae_jax) rounds, a one-pixel shift;
  * timm's pretrained_cfg fields (input_size, crop_pct, interpolation, mean, std), so that
    `timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))` is the view.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from mae_jax.data import pipeline
from mae_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CROP_PCT = 0.875  # pipeline.eval_resize's crop fraction: 224 of 256


class View(NamedTuple):
  """A run's evaluation view: square crop size and the normalisation."""
  image_size: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD


def run_view(image_size: int, run_config: dict[str, Any] | None) -> View:
  """The view of a run whose saved config (the JSON stored with its checkpoints) is
  `run_config`; ImageNet's mean and std (the reference's) where no run config is known."""
  inputs = (run_config or {}).get("input") or {}
  return View(image_size, tuple(inputs.get("mean", IMAGENET_MEAN)),
              tuple(inputs.get("std", IMAGENET_STD)))


def hf_view(directory: str, view: View) -> View:
  """`view` with the mean and std of the Hugging Face directory's preprocessor_config.json,
  where it has one that states them."""
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(path):
    return view
  try:
    with open(path) as f:
      processor = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None
  stats = [processor.get(k) if isinstance(processor, dict) else None
           for k in ("image_mean", "image_std")]
  if not all(isinstance(s, list) and len(s) == len(view.mean)
             and all(isinstance(v, (int, float)) for v in s) for s in stats):
    return view
  return view._replace(mean=tuple(stats[0]), std=tuple(stats[1]))


def hf_processor(view: View) -> dict[str, Any]:
  """preprocessor_config.json: the view as a Hugging Face image processor."""
  return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
          "do_resize": True, "size": {"shortest_edge": pipeline.eval_resize(view.image_size,
                                                                             CROP_PCT)},
          "resample": 3,  # PIL.Image.Resampling.BICUBIC
          "do_center_crop": True, "crop_size": {"height": view.image_size,
                                                "width": view.image_size},
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(view.mean), "image_std": list(view.std)}


def timm_pretrained_cfg(view: View, channels: int) -> dict[str, Any]:
  """The preprocessing fields of timm's pretrained_cfg for the view."""
  return {"input_size": [channels, view.image_size, view.image_size], "fixed_input_size": True,
          "interpolation": "bicubic", "crop_pct": CROP_PCT, "crop_mode": "center",
          "mean": list(view.mean), "std": list(view.std)}
