"""The pretraining input pipeline next to a plain PIL reference, timed round-robin in one run.

  python benchmarks/input_pipeline.py [--images 64] [--batch 32] [--batches 4] [--repeats 5]

Data: JPEGs made from real photographs (the colour photos inside scikit-image's wheel, the
demo's `demo.PHOTOS`): windows of each photo rescaled to ImageNet's typical 500x375 (and, for
the reduced-size decode, to 2000x1500, a phone photo) and re-encoded at JPEG quality 90.

Rows (images/s; each repeat pulls `batches` batches of `batch` 224 px crops from every row):
  * reference: decode, torchvision's RandomResizedCrop(224, scale=(0.2, 1)) (box, crop,
    bicubic resize), flip, ToTensor + Normalize, written here in PIL + torch as torchvision
    does it; one process, then torch's DataLoader with a worker per core;
  * ours: `pipeline.make_train_loader` with configs/base.py's input fields (uint8 batches,
    `normalize_on_device`), worker_count 0 (this process: one core), then grain workers
    (--workers), and with `draft_decode`;
  * ours with each lever taken back, one at a time: float32 batches normalised on the host
    (`normalize_on_device=False`), and JPEGs decoded by PIL instead of simplejpeg.
The one-process rows are timed round-robin; worker rows (whose processes would keep working
while other rows are timed) one after the other, each after its workers delivered a batch.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import tempfile
import time
from typing import Iterator

import numpy as np
from PIL import Image
import torch

from configs import base
from mae_jax.data import demo, pipeline, transforms

SIZES = {"imagenet": (500, 375), "large": (2000, 1500)}


def make_folder(root: str, images: int, size: tuple[int, int]) -> str:
  """`images` JPEGs of `size` (width, height), windows of the scikit-image photos."""
  rng = np.random.default_rng(0)
  for i in range(images):
    name = demo.PHOTOS[i % len(demo.PHOTOS)]
    photo = Image.fromarray(demo._load_photo(name))  # pylint: disable=protected-access
    w, h = photo.size
    fw, fh = rng.uniform(0.8, 1.0, 2)
    left, top = rng.uniform(0, 1 - fw) * w, rng.uniform(0, 1 - fh) * h
    window = photo.crop((int(left), int(top), int(left + fw * w), int(top + fh * h)))
    os.makedirs(os.path.join(root, "train", name), exist_ok=True)
    window.resize(size, Image.Resampling.LANCZOS).save(
        os.path.join(root, "train", name, f"{i:04d}.jpg"), quality=90)
  return root


class Reference(torch.utils.data.Dataset):
  """torchvision's pretraining transform, written out: the MAE reference's input."""

  def __init__(self, root: str, size: int = 224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    self.size, self.scale, self.ratio = size, scale, ratio
    self.mean = torch.tensor(base.IMAGENET_MEAN).view(3, 1, 1)
    self.std = torch.tensor(base.IMAGENET_STD).view(3, 1, 1)

  def __len__(self) -> int:
    return 1 << 30

  def box(self, width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
    for _ in range(10):
      target = area * random.uniform(*self.scale)
      aspect = math.exp(random.uniform(*log_ratio))
      w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        return random.randint(0, height - h), random.randint(0, width - w), h, w
    return 0, 0, height, width  # never reached at these sizes and ranges

  def __getitem__(self, i: int) -> torch.Tensor:
    with open(self.files[i % len(self.files)], "rb") as f:
      image = Image.open(f).convert("RGB")
    top, left, h, w = self.box(*image.size)
    image = image.crop((left, top, left + w, top + h)).resize(
        (self.size, self.size), Image.Resampling.BICUBIC)
    if random.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # ToTensor
    return x.float().div(255).sub_(self.mean).div_(self.std)  # Normalize, [3, H, W]


def reference_batches(root: str, batch: int, workers: int) -> Iterator[torch.Tensor]:
  if not workers:
    dataset = Reference(root)
    i = 0
    while True:
      yield torch.stack([dataset[i + k] for k in range(batch)])
      i += batch
  yield from torch.utils.data.DataLoader(Reference(root), batch_size=batch, num_workers=workers,
                                         persistent_workers=True, prefetch_factor=2)


def our_batches(root: str, batch: int, workers: int, buffer: int = 2, draft: bool = False,
                on_device: bool = True) -> Iterator[dict[str, np.ndarray]]:
  config = base.get_config().input
  config.update(dataset="folder", data_dir=root, worker_count=workers,
                worker_buffer_size=buffer, draft_decode=draft, normalize_on_device=on_device)
  return iter(pipeline.make_train_loader(config, image_size=224, global_batch_size=batch,
                                         seed=0, process_index=0, process_count=1))


def pil_decode(batches: Iterator) -> Iterator:
  """`batches` (in this process) with every JPEG decoded by PIL, as before simplejpeg."""
  fast = transforms._decode_jpeg  # pylint: disable=protected-access
  while True:
    transforms._decode_jpeg = lambda data, min_pixels: None  # pylint: disable=protected-access
    try:
      out = next(batches)
    finally:
      transforms._decode_jpeg = fast  # pylint: disable=protected-access
    yield out


def pixel_difference(root: str, batches: int) -> tuple[float, float]:
  """Mean and max |draft - full| in 0..255 grey levels over the same crops (same rng)."""
  full, draft = our_batches(root, 16, 0), our_batches(root, 16, 0, draft=True)
  diff = np.stack([np.abs(next(full)["image"].astype(np.float32) - next(draft)["image"])
                   for _ in range(batches)])
  return float(diff.mean()), float(diff.max())


def timed(iterator: Iterator, batches: int) -> float:
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="0: skip those rows")
  args = parser.parse_args()
  torch.set_num_threads(1)
  tmp = tempfile.mkdtemp()
  folders = {k: make_folder(os.path.join(tmp, k), args.images, size)
             for k, size in SIZES.items()}
  b, n = args.batch, args.workers
  # One process (one core), rows round-robin: name -> (iterator, row it is compared to).
  rows: dict[str, tuple[Iterator, str]] = {}
  for k, root in folders.items():
    px = "x".join(map(str, SIZES[k]))
    ref = f"{px} reference, 1 process"
    rows[ref] = (reference_batches(root, b, 0), ref)
    rows[f"{px} ours, worker_count 0"] = (our_batches(root, b, 0), ref)
    rows[f"{px} ours, worker_count 0, draft_decode"] = (our_batches(root, b, 0, draft=True), ref)
  root = folders["imagenet"]
  ref = "500x375 reference, 1 process"
  rows["500x375 ours, float32 normalised on the host"] = (
      our_batches(root, b, 0, on_device=False), ref)
  rows["500x375 ours, JPEGs decoded by PIL"] = (pil_decode(our_batches(root, b, 0)), ref)
  rows["500x375 ours, both: float32 on the host, PIL"] = (
      pil_decode(our_batches(root, b, 0, on_device=False)), ref)
  for it, _ in rows.values():
    next(it)  # start-up: files are listed, read threads start
  times = {name: [] for name in rows}
  for _ in range(args.repeats):
    for name, (it, _) in rows.items():
      times[name].append(timed(it, args.batches))
  # Worker processes keep producing while other rows run, so these rows are timed one after
  # the other, each with its own iterator (after its first batch: workers started).
  ref = f"500x375 reference, DataLoader {n} workers"
  worker_rows = {
      ref: lambda: reference_batches(root, b, n),
      f"500x375 ours, {n} grain workers, buffer 2": lambda: our_batches(root, b, n, 2),
      f"500x375 ours, {n} grain workers, float32 on the host": (
          lambda: our_batches(root, b, n, 2, on_device=False)),
  } if n else {}
  for name, make in worker_rows.items():
    it = make()
    next(it)
    times[name] = [timed(it, args.batches * n) / n for _ in range(args.repeats)]
    rows[name] = (it, ref)
    del it
    gc.collect()
  mean_diff, max_diff = pixel_difference(folders["large"], 4)
  print(f"{args.images} JPEGs per size, batch {b}, {args.batches} batches, median of "
        f"{args.repeats}, {os.cpu_count()} cpus, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
  rates = {name: args.batches * b / np.median(t) for name, t in times.items()}
  for name, rate in rates.items():
    print(f"  {name:52s} {rate:8.1f} images/s   x{rate / rates[rows[name][1]]:5.2f} of "
          f"{rows[name][1]}")
  print(f"draft_decode on 2000x1500 JPEGs: mean |difference| {mean_diff:.2f}, max "
        f"{max_diff:.0f} grey levels of 255 (same crops)")


if __name__ == "__main__":
  main()
