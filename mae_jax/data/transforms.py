"""Per-record grain transforms: robust decoding and MAE's augmentation.

Undecodable images. `DecodeImage` never raises: an image that cannot be decoded becomes
`{'image': None}` (with a logged warning naming the file when known); the training loader
(`pipeline.HostBatches`) then takes the next record that decodes and counts the skip in
the example's `skipped` field, so `batch['skipped'].sum()` is exact per batch, whatever
the number of hosts and workers.

Augmentation follows the reference MAE pretraining recipe: torchvision's
RandomResizedCrop (bicubic), RandomHorizontalFlip, ToTensor and Normalize.
Randomness comes only from the rng each example gets, seeded from the loader
seed and the example's global position (`pipeline.example_rng`): an example's
augmentation is the same whatever the number of hosts and workers.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

from absl import logging
import grain
import numpy as np
from PIL import Image
import simplejpeg

from mae_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def draft_scale(width: int, height: int, min_pixels: int) -> int:
  """The largest JPEG DCT scale (8, 4, 2 or 1) whose reduced image keeps >= min_pixels."""
  for scale in (8, 4, 2):
    if -(-width // scale) * -(-height // scale) >= min_pixels:
      return scale
  return 1


def _decode_jpeg(data: bytes, min_pixels: int) -> np.ndarray | None:
  """A YCbCr or grayscale JPEG decoded by simplejpeg, else None (other formats, CMYK).

  simplejpeg drives libjpeg-turbo as PIL does (accurate DCT, fancy upsampling) and decodes
  straight into one array: the same pixels as PIL's decode, its draft included (the tests
  check both), in ~2/3 of the time. Any error leaves the data to PIL, which raises or, for
  JPEGs with recoverable faults, decodes them as before.
  """
  if data[:2] != b"\xff\xd8":  # JPEG's start-of-image marker
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace not in ("YCbCr", "Gray"):  # PIL converts CMYK and others its own way
      return None
    if Image.MAX_IMAGE_PIXELS and height * width > 2 * Image.MAX_IMAGE_PIXELS:
      return None  # PIL raises DecompressionBombError for these: the image is skipped
    scale = draft_scale(width, height, min_pixels) if min_pixels else 1
    # The reduced sizes of libjpeg's 1/scale, which simplejpeg then picks (as PIL's draft).
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                  min_width=-(-width // scale))
  except ValueError:
    return None


def decode_rgb(image: bytes | np.ndarray, min_pixels: int = 0) -> np.ndarray:
  """Returns an RGB uint8 [H, W, 3] array from encoded bytes or an array.

  YCbCr and grayscale JPEGs are decoded by simplejpeg (`_decode_jpeg`), to PIL's pixels.
  Everything else goes through PIL: grayscale, palette, CMYK, ... by its RGB conversion; alpha
  is dropped (as `convert('RGB')` in torchvision's loader); 16-bit grayscale is
  rescaled rather than clipped at 255 as PIL would. Raises on corrupt data.
  min_pixels > 0: a JPEG is decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, PIL's
  `draft`: fewer pixels to decode, slightly different ones) when the reduced image still
  has >= min_pixels pixels; other formats and smaller JPEGs decode at full size.
  """
  if not isinstance(image, np.ndarray):
    decoded = _decode_jpeg(image, min_pixels)
    if decoded is not None:
      return decoded
    with Image.open(io.BytesIO(image)) as pil:
      if min_pixels:  # PIL drafts only JPEGs; other formats ignore it
        scale = draft_scale(*pil.size, min_pixels)
        if scale > 1:
          pil.draft(None, (pil.size[0] // scale, pil.size[1] // scale))
      pil.load()
      if pil.mode == "RGB":  # convert('RGB') would only copy the pixels
        return np.asarray(pil)
      if pil.mode not in _SIXTEEN_BIT_MODES:
        return np.asarray(pil.convert("RGB"))
      image = np.asarray(pil)
  if image.dtype != np.uint8:  # 16-bit samples.
    image = np.round(np.clip(image, 0, 65535) / 257).astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"Not an image array: shape {image.shape}")
  if image.shape[-1] in (1, 2):  # Gray, gray + alpha.
    return np.repeat(image[..., :1], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


@dataclasses.dataclass
class DecodeImage(grain.transforms.Map):
  """Decodes `image` to RGB uint8, or to None (logged) when undecodable.

  Keeps the record's integer `label` when it has one; other fields are dropped.
  `min_pixels`: reduced-size JPEG decoding, see `decode_rgb` (0: off).
  """

  min_pixels: int = 0

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = {"label": np.int32(element["label"])} if "label" in element else {}
    try:
      return {"image": decode_rgb(element["image"], self.min_pixels), **out}
    except Exception as e:  # pylint: disable=broad-except
      # PIL raises many types (OSError, SyntaxError, DecompressionBombError..).
      logging.warning("Skipping undecodable image %s: %s: %s",
                      element.get("file_name", "<no file name>"),
                      type(e).__name__, e)
      return {"image": None, **out}


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Returns (top, left, h, w) exactly as torchvision's RandomResizedCrop.

  Ten tries of a random area fraction in `scale` and log-uniform aspect ratio
  in `ratio`; if none fits, the largest centred crop with a ratio in range.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def draft_min_pixels(image_size: int, scale: tuple[float, float],
                     ratio: tuple[float, float]) -> int:
  """The fewest image pixels for which every RandomResizedCrop box has both sides
  >= image_size (so a reduced-size decode never makes a crop upsampled that was not).

  A box of area fraction s and aspect r has sides sqrt(s A r) and sqrt(s A / r); the shortest
  is sqrt(scale[0] A min(ratio[0], 1 / ratio[1])).
  """
  return math.ceil(image_size**2 / (scale[0] * min(ratio[0], 1 / ratio[1])))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """PIL bicubic resize to (width, height) `size`, as torchvision does it."""
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


@dataclasses.dataclass
class RandomResizedCrop(grain.transforms.RandomMap):
  """torchvision RandomResizedCrop with bicubic resize to a square."""

  image_size: int
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    top, left, h, w = random_resized_crop_box(*image.shape[:2], rng,
                                              self.scale, self.ratio)
    # Crop, then resize: PIL's resize(box=...) would also read pixels around
    # the box, unlike torchvision.
    crop = image[top:top + h, left:left + w]
    return {**element,
            "image": _resize(crop, (self.image_size, self.image_size))}


class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2.

  The mirror is a view: the batch's stacking copies it once, as it copies every image.
  """

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      return {**element, "image": element["image"][:, ::-1]}
    return element


@dataclasses.dataclass
class ResizeCenterCrop(grain.transforms.Map):
  """Evaluation view: shorter side to `resize` (default `image_size`), then a centre
  `image_size` square crop.

  Sizes and offsets follow torchvision's Resize(int) and CenterCrop.
  """

  image_size: int
  resize: int | None = None

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element["image"]
    height, width = image.shape[:2]
    size = self.resize or self.image_size
    if height <= width:
      new_h, new_w = size, int(size * width / height)
    else:
      new_h, new_w = int(size * height / width), size
    image = _resize(image, (new_w, new_h))
    crop = self.image_size
    top = int(round((new_h - crop) / 2))
    left = int(round((new_w - crop) / 2))
    return {**element, "image": image[top:top + crop, left:left + crop]}


def normalize_constants(mean: tuple[float, ...], std: tuple[float, ...]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """float32 (scale, offset) per channel with `(x / 255 - mean) / std = x * scale - offset`.

  One multiply-add, x / (255 std) - mean / std: within 5e-7 of the formula and half its time.
  `Normalize` (on the host) and `pipeline.device_images` (in the step) both use these.
  """
  std = np.asarray(std, np.float32)
  return np.float32(1.0) / (np.float32(255.0) * std), np.asarray(mean, np.float32) / std


@dataclasses.dataclass
class Normalize(grain.transforms.Map):
  """uint8 RGB -> float32 `(x / 255 - mean) / std`, mean and std per channel."""

  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    self._scale, self._offset = normalize_constants(self.mean, self.std)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element["image"].astype(np.float32)
    image *= self._scale
    image -= self._offset
    return {**element, "image": image}
