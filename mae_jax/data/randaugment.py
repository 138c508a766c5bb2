"""RandAugment as timm's `rand_augment_transform` (the fine-tuning recipe's
`rand-m9-mstd0.5-inc1`), and random erasing as timm's `RandomErasing(mode='pixel')`.

RandAugment: `n` ops (default 2) drawn uniformly with replacement from the 15 'increasing'
ops; each is applied with probability 0.5 at a magnitude ~ N(m, mstd) clipped to [0, 10];
geometric ops fill with the dataset mean and resample bicubically, and their sign is
random. Randomness comes only from the per-record rng grain gives (the same draws whatever
the worker count), so an example's augmentation at a step is reproducible.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple, fill: tuple[int, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix,
                         resample=Image.Resampling.BICUBIC, fillcolor=fill)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
  """Keeps the top `bits` of each channel; 0 bits gives black, as PIL did before it refused
  0 (timm's PosterizeIncreasing reaches 0 at magnitude 10)."""
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return image.point([i & mask for i in range(256)] * len(image.getbands()))


def _enhance(kind) -> Callable:
  def op(image, level, rng, fill):
    return kind(image).enhance(1.0 + _signed(level / MAX_LEVEL * 0.9, rng))
  return op


# name -> op(image, level in [0, 10], rng, fill colour) (timm's _RAND_INCREASING_TRANSFORMS)
OPS: dict[str, Callable[[Image.Image, float, np.random.Generator, tuple], Image.Image]] = {
    "AutoContrast": lambda im, lv, rng, fill: ImageOps.autocontrast(im),
    "Equalize": lambda im, lv, rng, fill: ImageOps.equalize(im),
    "Invert": lambda im, lv, rng, fill: ImageOps.invert(im),
    "Rotate": lambda im, lv, rng, fill: im.rotate(_signed(lv / MAX_LEVEL * 30, rng),
                                                  resample=Image.Resampling.BICUBIC,
                                                  fillcolor=fill),
    "PosterizeIncreasing": lambda im, lv, rng, fill: _posterize(im,
                                                                4 - int(lv / MAX_LEVEL * 4)),
    "SolarizeIncreasing": lambda im, lv, rng, fill: ImageOps.solarize(
        im, 256 - int(lv / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda im, lv, rng, fill: _solarize_add(im, int(lv / MAX_LEVEL * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda im, lv, rng, fill: _affine(
        im, (1, _signed(lv / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0), fill),
    "ShearY": lambda im, lv, rng, fill: _affine(
        im, (1, 0, 0, _signed(lv / MAX_LEVEL * 0.3, rng), 1, 0), fill),
    "TranslateXRel": lambda im, lv, rng, fill: _affine(
        im, (1, 0, _signed(lv / MAX_LEVEL * 0.45, rng) * im.size[0], 0, 1, 0), fill),
    "TranslateYRel": lambda im, lv, rng, fill: _affine(
        im, (1, 0, 0, 0, 1, _signed(lv / MAX_LEVEL * 0.45, rng) * im.size[1]), fill),
}


def parse_spec(spec: str) -> dict[str, float]:
  """'rand-m9-mstd0.5-inc1' -> {'m': 9, 'n': 2, 'mstd': 0.5}; only the increasing ops.
  What a spec leaves out is timm's default: magnitude 10, 2 ops, no deviation."""
  parts = spec.split("-")
  out = {"m": 10.0, "n": 2.0, "mstd": 0.0}
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-'")
  for part in parts[1:]:
    key = next((k for k in ("mstd", "inc", "m", "n") if part.startswith(k)), None)
    try:
      value = float(part[len(key):]) if key else None
    except ValueError:
      value = None
    if value is None:
      raise ValueError(f"RandAugment spec {spec!r}: cannot read {part!r} (m<magnitude>, "
                       "n<ops>, mstd<std>, inc1)")
    if key == "inc":
      if value != 1:
        raise ValueError(f"RandAugment spec {spec!r}: only the increasing ops (inc1)")
    else:
      out[key] = value
  return out


@dataclasses.dataclass
class RandAugment(grain.transforms.RandomMap):
  """uint8 [H, W, 3] -> uint8 [H, W, 3], `spec` as timm's ('rand-m9-mstd0.5-inc1')."""

  spec: str
  mean: tuple[float, float, float]

  def __post_init__(self):
    args = parse_spec(self.spec)
    self.magnitude, self.num_ops, self.std = args["m"], int(args["n"]), args["mstd"]
    self.fill = tuple(min(255, round(255 * x)) for x in self.mean)
    self.names = tuple(OPS)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = Image.fromarray(element["image"])
    for i in rng.integers(0, len(self.names), self.num_ops):  # with replacement
      if rng.random() > 0.5:  # each op applies with probability 0.5
        continue
      level = self.magnitude + (rng.normal() * self.std if self.std > 0 else 0.0)
      level = min(MAX_LEVEL, max(0.0, level))
      image = OPS[self.names[i]](image, level, rng, self.fill)
    return {**element, "image": np.asarray(image)}


@dataclasses.dataclass
class RandomErasing(grain.transforms.RandomMap):
  """With probability `prob`, one box of 2-33% of the area (aspect 0.3-3.3) of the
  normalised float image is replaced by per-pixel standard normal noise."""

  prob: float = 0.25

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.prob:
      return element
    image = element["image"]
    height, width, channels = image.shape
    for _ in range(10):
      area = rng.uniform(0.02, 1 / 3) * height * width
      aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
      h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        image = image.copy()
        image[top:top + h, left:left + w] = rng.normal(size=(h, w, channels))
        return {**element, "image": image}
    return element
