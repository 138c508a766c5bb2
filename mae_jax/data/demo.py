"""A small demo dataset of real photographs, built offline.

scikit-image ships a few sample photographs inside its wheel. We cut
deterministic square crops from them at two scales (a quarter and a half of the
shorter side) and store them as an image folder with one class per photograph,
so the tiny demo model has natural image statistics to learn from and a
labelled set for kNN / linear-probe smoke tests. Validation crops come from the
right quarter of each photograph, which the training crops never touch.

Other `skimage.data` images (brain, eagle, lily, kidney, ...) are fetched with
pooch on first use, so they do not work offline and are not used.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image
import skimage.data

# Colour photographs stored inside the scikit-image wheel.
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
    "hubble_deep_field", "immunohistochemistry", "retina",
)
TRAIN_CROPS_PER_PHOTO = 40
VAL_CROPS_PER_PHOTO = 4
CROP_PIXELS = 96
_TRAIN_SCALES = (0.25, 0.5)  # Crop side as a fraction of the shorter side.
_VAL_SCALE = 0.25
_TRAIN_WIDTH = 0.75  # Training crops stay in the left 75% of a photograph.
_VERSION = "v1"  # Bump when the recipe changes, so caches are rebuilt.


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "mae_jax", "demo")


def _load_photo(name: str) -> np.ndarray:
  image = getattr(skimage.data, name)()
  if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity).
    image = image[0]
  return image


def _save_crop(photo: np.ndarray, top: int, left: int, side: int,
               path: str) -> None:
  crop = Image.fromarray(photo[top:top + side, left:left + side])
  crop = crop.resize((CROP_PIXELS, CROP_PIXELS), Image.Resampling.LANCZOS)
  crop.save(path, format="JPEG", quality=90)


def _write_crops(root: str) -> None:
  for index, name in enumerate(PHOTOS):
    photo = _load_photo(name)
    height, width = photo.shape[:2]
    train_width = int(_TRAIN_WIDTH * width)
    rng = np.random.default_rng(index)
    for split in ("train", "val"):
      os.makedirs(os.path.join(root, split, name))
    for k in range(TRAIN_CROPS_PER_PHOTO):
      side = int(_TRAIN_SCALES[k % len(_TRAIN_SCALES)] * min(height, width))
      top = int(rng.integers(0, height - side + 1))
      left = int(rng.integers(0, train_width - side + 1))
      _save_crop(photo, top, left, side,
                 os.path.join(root, "train", name, f"{name}_{k:03d}.jpg"))
    side = int(_VAL_SCALE * min(height, width))
    for k in range(VAL_CROPS_PER_PHOTO):
      top = int(rng.integers(0, height - side + 1))
      left = int(rng.integers(train_width, width - side + 1))
      _save_crop(photo, top, left, side,
                 os.path.join(root, "val", name, f"{name}_{k:03d}.jpg"))


def build_demo(cache_dir: str | None = None) -> str:
  """Builds the demo image folder once and returns its root.

  The folder is written under a temporary name and renamed into place, so
  concurrent processes never read a half-built dataset: whichever rename
  loses finds the finished folder and uses it.
  """
  cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
  root = os.path.join(cache_dir, _VERSION)
  if os.path.isdir(root):
    return root
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{_VERSION}-building-", dir=cache_dir)
  try:
    _write_crops(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shareable.
    os.rename(tmp, root)
  except OSError:
    if not os.path.isdir(root):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root
