"""Random-access image sources for grain.

Every source is indexable and returns records whose `image` entry is the
encoded image (bytes) or, for tfds features that are stored decoded, a uint8
array. Decoding happens later in `transforms.DecodeImage`, inside grain's
workers, so that corrupt files are skipped there instead of crashing a read.

Sources define a stable `__repr__`: grain compares it when an iterator state is
restored, to refuse resuming on different data.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from typing import Any, Iterator

from absl import logging as absl_logging
from etils import epath
import grain
import numpy as np
import tensorflow_datasets as tfds

from mae_jax import storage
from mae_jax.data import demo

# The extensions torchvision's ImageFolder (used by the reference MAE) accepts.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)


class ImageFolderSource:
  """Image files listed once, read lazily; records carry bytes and the label."""

  def __init__(self, root: epath.Path, paths: list[str], labels: list[int],
               classes: list[str]):
    self.root = root
    self.paths = paths
    self.labels = labels
    self.classes = classes
    digest = hashlib.sha1("\n".join(paths).encode()).hexdigest()[:12]
    self._repr = (f"ImageFolderSource(num_records={len(paths)}, "
                  f"num_classes={len(classes)}, files_sha1={digest})")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    data = (self.root / path).read_bytes()
    return {"image": data, "label": self.labels[index], "file_name": path}

  def __repr__(self) -> str:
    # Names the relative file list, not the root: the same files mounted
    # elsewhere are the same data for resuming.
    return self._repr


def folder_source(root: str, split: str = "train") -> ImageFolderSource:
  """Lists `root/<split>/<class>/**/<image>` in sorted, deterministic order; `root` is a
  local folder or a bucket path (gs://)."""
  storage.check(root, "image folder")
  split_dir = storage.path(root) / split
  if not split_dir.is_dir():
    raise FileNotFoundError(
        f"Image folder {str(split_dir)!r} does not exist: expected the layout "
        f"{root}/{split}/<class>/<image>.jpg (as torchvision ImageFolder).")
  classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = [str(f.relative_to(split_dir)) for f in storage.walk_files(split_dir / name)
             if f.name.lower().endswith(IMAGE_EXTENSIONS)]
    paths += sorted(found)
    labels += [label] * len(found)
  if not paths:
    raise FileNotFoundError(
        f"Image folder {str(split_dir)!r} has no images: expected "
        f"{split_dir}/<class>/<image> with extensions {IMAGE_EXTENSIONS}.")
  return ImageFolderSource(split_dir, paths, labels, classes)


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
  """Silences absl logging below ERROR inside the block (tfds logs through absl)."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def tfds_source(name: str, split: str,
                data_dir: str | None = None) -> grain.sources.RandomAccessDataSource:
  """Reads a prepared tfds dataset (ArrayRecord), never downloading.

  Image features are returned as encoded bytes (tfds decoding skipped) so that
  `DecodeImage` handles every image mode and skips corrupt ones.
  """
  storage.check(data_dir, "tfds data_dir")
  with quiet_absl():  # tfds warns about each folder of a dataset that is not prepared
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    manual = (" --manual_dir=<dir holding the archives>"
              if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else "")
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in data_dir "
        f"{str(builder.data_dir_root)!r} (looked for {builder.data_dir}). "
        "mae_jax never downloads; prepare it once (building needs tensorflow "
        f"installed, reading does not): tfds build {name} "
        f"--data_dir={builder.data_dir_root}{manual} "
        "--file_format=array_record")
  try:
    builder.info.splits[split]  # also accepts slices such as 'train[:10%]'
  except (KeyError, ValueError):
    raise ValueError(f"tfds dataset {name!r} has no split {split!r}; splits: "
                     f"{sorted(builder.info.splits)}") from None
  if "image" not in builder.info.features:
    raise ValueError(f"tfds dataset {name!r} has no `image` feature; "
                     f"features: {list(builder.info.features)}")
  decoders = None
  if isinstance(builder.info.features["image"], tfds.features.Image):
    decoders = {"image": tfds.decode.SkipDecoding()}
  return builder.as_data_source(split=split, decoders=decoders)


def demo_source(split: str = "train",
                cache_dir: str | None = None) -> ImageFolderSource:
  """The bundled demo photographs (built once offline), split 'train' or 'val'."""
  if cache_dir is not None and "://" in cache_dir:
    raise ValueError(f"the demo data cache {cache_dir!r} must be a local folder; for images "
                     "in a bucket use dataset='folder'")
  return folder_source(demo.build_demo(cache_dir), split)


# scikit-learn's handwritten digits: 1797 real 8x8 grayscale scans, 10 classes, shipped in its
# wheel. A fixed split: a seeded permutation, the first 360 (20%) for testing.
DIGITS_TEST = 360


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 1797 digits as float [N, 8, 8] in 0..16 and int32 labels [N], as scikit-learn's
  `load_digits` returns them, read from the file in its wheel: importing scikit-learn to read
  it would add ~2-3 s to every start."""
  spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
  path = spec and os.path.join(os.path.dirname(spec.origin), "datasets", "data",
                               "digits.csv.gz")
  if not path or not os.path.exists(path):
    raise FileNotFoundError("dataset 'digits' reads the handwritten digits that scikit-learn "
                            "ships in its wheel (sklearn/datasets/data/digits.csv.gz): "
                            "pip install scikit-learn")
  data = np.loadtxt(path, delimiter=",")  # [N, 65]: 64 pixels, then the label
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int32)


class DigitsSource:
  """scikit-learn's digits as uint8 [8, 8] images (0..16 rescaled to 0..255) with labels."""

  num_classes = 10
  in_memory = True  # read without threads (pipeline.read_options)

  def __init__(self, split: str):
    if split not in ("train", "test"):
      raise ValueError(f"dataset 'digits' has splits 'train' and 'test', not {split!r}")
    images, labels = _load_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    order = order[:DIGITS_TEST] if split == "test" else order[DIGITS_TEST:]
    self.images = np.round(images[order] * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
    self.labels = labels[order]
    self._repr = f"DigitsSource(split={split!r}, num_records={len(order)})"

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return self._repr


def class_count(source: Any) -> int | None:
  """The number of label classes of a source, or None when its records carry no label."""
  if isinstance(source, ImageFolderSource):
    return len(source.classes)
  if isinstance(source, DigitsSource):
    return source.num_classes
  info = getattr(source, "dataset_info", None)  # a tfds data source
  if info is None or "label" not in info.features.keys():
    return None
  return getattr(info.features["label"], "num_classes", None)


def class_names(source: Any) -> list[str] | None:
  """The names of a source's label classes in label order (an image folder's directory names,
  a tfds ClassLabel's names, "0".."9" for the digits), or None where it names none."""
  if isinstance(source, ImageFolderSource):
    return list(source.classes)
  if isinstance(source, DigitsSource):
    return [str(i) for i in range(source.num_classes)]
  info = getattr(source, "dataset_info", None)  # a tfds data source
  if info is None or "label" not in info.features.keys():
    return None
  names = getattr(info.features["label"], "names", None)
  return list(names) if names else None


def check_num_classes(num_classes: int, source: Any, what: str) -> None:
  """A classification task needs labels, and as many classes as the dataset has."""
  found = class_count(source)
  if found is None:
    raise ValueError(f"{what} ({source!r}) has no labels; a classification task needs them")
  if found != num_classes:
    raise ValueError(f"config.num_classes is {num_classes} but {what} has {found} classes")
