"""The pretraining input pipeline: source -> decode -> augment -> host batch.

The training sample sequence is a function of (seed, global position) only. Position g
(0, 1, 2, ... over the whole run) holds record `shuffle_{seed + epoch}(g mod N)` of the
N-record source (a new permutation each epoch), augmented with an rng drawn from (seed, g);
global batch k is positions k*B ... k*B + B - 1. Host p of P builds its part of it,
positions k*B + p*B/P ... k*B + (p+1)*B/P - 1, and `to_global_array` assembles the hosts'
parts into one global `jax.Array`. So which records form batch k, and each record's
augmentation, depend on neither the process count nor the loader's worker count, and the
data position of a run is one integer, the next global batch (the train step: one global
batch per step), valid on any layout whose process count divides B. A run resumes on
another number of hosts, devices or workers by starting the loader at its step.

`input_config` fields (attributes; all but `dataset` optional):
  dataset: 'demo', 'digits' (scikit-learn's, splits 'train'/'test'), 'folder',
    or a tfds name ('imagenet2012', 'cifar10', ...).
  data_dir: tfds data_dir; image-folder root for 'folder'; demo cache for
    'demo'. Default None (tfds default dir, demo in ~/.cache/mae_jax/demo).
  split: training split. Default 'train'.
  eval_split: split for evaluation (`make_eval_loader`, `make_eval_batch`).
    Default 'validation' for tfds, 'val' for folders and the demo, 'test' for digits.
  crop_scale, crop_ratio: RandomResizedCrop ranges. Default (0.2, 1.0) and
    (3/4, 4/3), the MAE recipe.
  hflip: random horizontal flip. Default True.
  mean, std: per-channel normalisation of [0, 1] pixels. Default ImageNet's.
  normalize_on_device: True: training batches carry uint8 pixels, which the train step
    normalises on the device (`device_images`): a quarter of the bytes to copy and send, and
    no float work on the host (~1/4 of its time per image, benchmarks/input_pipeline.py).
    Not with `reprob` (random erasing fills normalised pixels on the host). Default False:
    float32 batches normalised on the host, as torchvision's ToTensor + Normalize.
  worker_count: grain worker processes (0 = in this process). Default 0.
  worker_buffer_size: batches each worker prepares ahead. Default 1.
  draft_decode: decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when every
    RandomResizedCrop box of the reduced image is still >= image_size on both sides: much
    faster on photos several times the crop's size, slightly different pixels (mean absolute
    difference 1.3 grey levels of 255 on 2000x1500 photos, benchmarks/input_pipeline.py).
    ImageNet-sized (~500x375) images at 224 px always decode at full size. Default False.
  randaugment: a timm RandAugment spec applied after the flip (fine-tuning:
    'rand-m9-mstd0.5-inc1'). Default None (off).
  reprob: random erasing probability, after normalising. Default 0 (off).
  read_threads: threads that read, decode and augment the records of a host batch together
    (numpy and PIL release the GIL); for the evaluation loader, threads reading records
    (grain's `ReadOptions`). Default None: 0 for sources held in memory (digits), where
    threads only contend for the GIL, 16 for files and ArrayRecord (remote disks).
  read_buffer: records the evaluation loader reads ahead. Default 64: grain's default of
    500 costs ~0.5-1 ms per record in this process on its own (it scans the ready part of
    the buffer on every record).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

from absl import flags
import grain
from grain.experimental import index_shuffle
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.data import randaugment
from mae_jax.data import sources
from mae_jax.data import transforms

_DEFAULTS = {
    "data_dir": None,
    "split": "train",
    "eval_split": None,
    "crop_scale": (0.2, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "hflip": True,
    "mean": transforms.IMAGENET_MEAN,
    "std": transforms.IMAGENET_STD,
    "worker_count": 0,
    "worker_buffer_size": 1,
    "draft_decode": False,
    "normalize_on_device": False,
    "randaugment": None,
    "reprob": 0.0,
    "read_threads": None,
    "read_buffer": 64,
}


def _field(input_config: Any, name: str) -> Any:
  return getattr(input_config, name, _DEFAULTS[name])


def train_image_dtype(input_config: Any) -> np.dtype:
  """The dtype of training batches' images: uint8 with `normalize_on_device`, else float32."""
  return np.dtype(np.uint8 if _field(input_config, "normalize_on_device") else np.float32)


def device_images(images: jax.Array, input_config: Any) -> jax.Array:
  """[B, H, W, 3] -> the model's float32 input, inside a jitted step: uint8 pixels
  (`normalize_on_device`) are normalised as `transforms.Normalize` does on the host, with
  the same float32 constants; float images were normalised on the host and pass."""
  if images.dtype != jnp.uint8:
    return images
  scale, offset = transforms.normalize_constants(_field(input_config, "mean"),
                                                 _field(input_config, "std"))
  return images.astype(jnp.float32) * scale - offset  # [B, H, W, 3]


def _threads(input_config: Any, source: Any) -> int:
  """`read_threads`, or its default for `source`: 0 in memory, else 16."""
  threads = _field(input_config, "read_threads")
  if threads is None:
    threads = 0 if getattr(source, "in_memory", False) else 16
  return threads


def read_options(input_config: Any, source: Any) -> grain.ReadOptions:
  """How many threads read records ahead, and how far: see `read_threads`, `read_buffer`."""
  return grain.ReadOptions(num_threads=_threads(input_config, source),
                           prefetch_buffer_size=_field(input_config, "read_buffer"))


def make_source(input_config: Any,
                split: str) -> grain.sources.RandomAccessDataSource:
  """The raw-record source named by `input_config.dataset`, for `split`."""
  dataset = input_config.dataset
  data_dir = _field(input_config, "data_dir")
  if dataset == "demo":
    return sources.demo_source(split, cache_dir=data_dir)
  if dataset == "digits":
    return sources.DigitsSource(split)
  if dataset == "folder":
    if not data_dir:
      raise ValueError("dataset='folder' needs input_config.data_dir, the "
                       "root holding <split>/<class>/<image> folders.")
    return sources.folder_source(data_dir, split)
  return sources.tfds_source(dataset, split, data_dir)


def record_at(position: int, num_records: int, seed: int) -> int:
  """The source record at global position `position` of the training sequence: epoch
  e = position // N is a permutation of the N records, seeded with seed + e (grain's
  `index_shuffle`, the permutation its own shuffles use)."""
  epoch, index = divmod(position, num_records)
  return int(index_shuffle(index, max_index=num_records - 1, seed=(seed + epoch) % 2**32,
                           rounds=4))


def example_rng(seed: int, position: int) -> np.random.Generator:
  """The augmentation rng of global position `position`: Philox keyed by (seed, position)."""
  return np.random.Generator(np.random.Philox(key=(seed % 2**64) * 2**64 + position))


class HostBatches(grain.transforms.Map):
  """Global batch index k -> this host's part of global batch k (see the module docstring).

  Each example is read, decoded and augmented on its own, from its global position alone,
  by `threads` threads together (0: in turn). An undecodable record is logged and replaced
  by the next record of the source that decodes; `skipped` counts the records passed over.
  """

  def __init__(self, source: Any, decode: transforms.DecodeImage, operations: list[Any], *,
               seed: int, global_batch: int, process_index: int, process_count: int,
               threads: int):
    self.source, self.decode, self.operations = source, decode, operations
    self.seed, self.threads = seed, threads
    self.global_batch = global_batch
    self.host_batch = global_batch // process_count
    self.offset = process_index * self.host_batch
    self._pool = None

  def __getstate__(self) -> dict[str, Any]:  # grain workers get a copy, without the pool
    return {**self.__dict__, "_pool": None}

  def example(self, position: int) -> dict[str, Any]:
    n = len(self.source)
    record = record_at(position, n, self.seed)
    for skipped in range(n):
      element = self.decode.map(self.source[(record + skipped) % n])
      if element["image"] is not None:
        break
    else:
      raise ValueError(f"no record of {self.source!r} decodes")
    rng = example_rng(self.seed, position)
    for op in self.operations:
      element = (op.random_map(element, rng) if isinstance(op, grain.transforms.RandomMap)
                 else op.map(element))
    return {**element, "skipped": np.int32(skipped)}

  def map(self, batch_index: int) -> dict[str, np.ndarray]:
    first = batch_index * self.global_batch + self.offset
    positions = range(first, first + self.host_batch)
    if self.threads:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)
      examples = list(self._pool.map(self.example, positions))
    else:
      examples = [self.example(g) for g in positions]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_train_loader(
    input_config: Any,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    start_batch: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    source: grain.sources.RandomAccessDataSource | None = None,
) -> grain.IterDataset:
  """This host's parts of global batches start_batch, start_batch + 1, ... (endless).

  Batches are `{'image': float32 [b, image_size, image_size, 3] (uint8 with
  `normalize_on_device`), 'skipped': int32 [b]}` (and int32 'label' [b] for labelled data)
  with b = global_batch_size // process_count; `skipped.sum()` counts undecodable records
  passed over. `worker_count` grain processes build whole batches in turn, so the batches
  are the same for any worker count. `source`: the source of `input_config.split` when the
  caller opened it already.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by the "
        f"process count {process_count}; every host must load the same "
        "number of examples.")
  on_device = _field(input_config, "normalize_on_device")
  if on_device and _field(input_config, "reprob") > 0:
    raise ValueError(
        f"input.normalize_on_device=True cannot be combined with input.reprob="
        f"{_field(input_config, 'reprob')}: random erasing fills normalised pixels on the "
        "host; set input.normalize_on_device=False (or reprob=0)")
  if source is None:  # the caller may pass the one it opened already (listing is slow)
    source = make_source(input_config, _field(input_config, "split"))
  scale = tuple(_field(input_config, "crop_scale"))
  ratio = tuple(_field(input_config, "crop_ratio"))
  min_pixels = (transforms.draft_min_pixels(image_size, scale, ratio)
                if _field(input_config, "draft_decode") else 0)
  operations = [transforms.RandomResizedCrop(image_size, scale=scale, ratio=ratio)]
  if _field(input_config, "hflip"):
    operations.append(transforms.RandomHorizontalFlip())
  mean = tuple(_field(input_config, "mean"))
  if _field(input_config, "randaugment"):
    operations.append(randaugment.RandAugment(_field(input_config, "randaugment"), mean))
  if not on_device:
    operations.append(transforms.Normalize(mean, tuple(_field(input_config, "std"))))
  if _field(input_config, "reprob") > 0:
    operations.append(randaugment.RandomErasing(_field(input_config, "reprob")))
  batches = HostBatches(source, transforms.DecodeImage(min_pixels), operations, seed=seed,
                        global_batch=global_batch_size, process_index=process_index,
                        process_count=process_count, threads=_threads(input_config, source))
  # Batch indices start_batch ... (2**62: endless in practice), one batch read ahead.
  dataset = grain.MapDataset.range(start_batch, 2**62).map(batches).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  worker_count = _field(input_config, "worker_count")
  if worker_count:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 workers read an absl flag and fail unless flags are parsed
      # (google/grain#1355), as in scripts and tests that do not use absl.app.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count,
        per_worker_buffer_size=_field(input_config, "worker_buffer_size")))
  return dataset


def eval_split(input_config: Any) -> str:
  """The configured evaluation split, or the dataset's usual one."""
  split = _field(input_config, "eval_split")
  if split is not None:
    return split
  return {"demo": "val", "folder": "val", "digits": "test"}.get(input_config.dataset,
                                                                 "validation")


def eval_resize(image_size: int, crop_fraction: float = 0.875) -> int:
  """The shorter side before the centre crop: 256 for 224, scaled for other sizes."""
  return int(image_size / crop_fraction)


class _PaddedShard:
  """This host's records of a split, padded with placeholders to a whole number of batches.

  Record i of the shard is `source[indices[i]]`, or a placeholder (index -1) that the eval
  transforms turn into a zero image with `valid` 0.
  """

  def __init__(self, source: Any, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    index = int(self.indices[i])
    return {"image": None, "label": 0} if index < 0 else self.source[index]

  def __repr__(self) -> str:
    return f"_PaddedShard({self.source!r}, {len(self.indices)} records)"


def shard_indices(num_records: int, per_host_batch: int, process_index: int,
                  process_count: int) -> np.ndarray:
  """Host `process_index`'s record indices: a contiguous block of ceil(N / hosts), padded
  with -1 to a multiple of the per-host batch, so every host runs the same number of batches
  and every record is in exactly one host's block."""
  per_host = -(-num_records // process_count)
  per_host_padded = -(-per_host // per_host_batch) * per_host_batch
  start = process_index * per_host
  block = np.arange(start, min(start + per_host, num_records))
  return np.concatenate([block, -np.ones(per_host_padded - len(block), np.int64)])


@dataclasses.dataclass
class _EvalView(grain.transforms.Map):
  """Decode -> resize shorter side -> centre crop -> normalise, with a `valid` flag that is
  0 for padding and for undecodable images (which are logged and not counted)."""

  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    label = np.int32(element.get("label", -1))
    if element["image"] is not None:
      decoded = transforms.DecodeImage().map(element)["image"]
      if decoded is not None:
        image = transforms.ResizeCenterCrop(self.image_size, eval_resize(self.image_size)).map(
            {"image": decoded})["image"]
        image = transforms.Normalize(self.mean, self.std).map({"image": image})["image"]
        return {"image": image, "label": label, "valid": np.int32(1)}
    zeros = np.zeros((self.image_size, self.image_size, 3), np.float32)
    return {"image": zeros, "label": label, "valid": np.int32(0)}


def make_eval_loader(input_config: Any, split: str, *, image_size: int,
                     global_batch_size: int, process_index: int | None = None,
                     process_count: int | None = None, source: Any = None
                     ) -> grain.DataLoader:
  """One deterministic pass over `split`: every record exactly once over all hosts.

  The evaluation view of the reference: resize the shorter side to image_size / 0.875
  (256 for 224, bicubic), centre crop image_size. Batches are {'image' [B, H, W, 3] float32,
  'label' [B] int32 (-1 without labels), 'valid' [B] int32} with B = global batch / hosts;
  the last batches are padded with `valid` 0, so count only valid rows.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"evaluation batch {global_batch_size} is not divisible by the process "
                     f"count {process_count}")
  per_host_batch = global_batch_size // process_count
  if source is None:
    source = make_source(input_config, split)
  shard = _PaddedShard(source, shard_indices(len(source), per_host_batch, process_index,
                                             process_count))
  worker_count = _field(input_config, "worker_count")
  if worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # see make_train_loader
  return grain.DataLoader(
      data_source=shard,
      sampler=grain.samplers.SequentialSampler(len(shard), grain.sharding.NoSharding()),
      operations=[_EvalView(image_size, tuple(_field(input_config, "mean")),
                            tuple(_field(input_config, "std"))),
                  grain.transforms.Batch(per_host_batch, drop_remainder=False)],
      worker_count=worker_count,
      worker_buffer_size=_field(input_config, "worker_buffer_size"),
      read_options=read_options(input_config, source))


def make_eval_batch(input_config: Any, *, image_size: int,
                    num_images: int) -> np.ndarray:
  """A fixed float32 [num_images, image_size, image_size, 3] normalised batch.

  Images are spread evenly over the evaluation split (so folder-style splits,
  sorted by class, show several classes), resized on the shorter side and
  centre-cropped; undecodable ones are replaced by later records.
  """
  split = eval_split(input_config)
  source = make_source(input_config, split)
  stride = max(1, len(source) // num_images)
  order = [*range(0, len(source), stride),
           *(i for i in range(len(source)) if i % stride)]
  decode = transforms.DecodeImage()
  crop = transforms.ResizeCenterCrop(image_size)
  normalize = transforms.Normalize(tuple(_field(input_config, "mean")),
                                   tuple(_field(input_config, "std")))
  images = []
  for index in order:
    element = decode.map(source[index])
    if element["image"] is not None:
      images.append(normalize.map(crop.map(element))["image"])
    if len(images) == num_images:
      return np.stack(images)
  raise ValueError(f"Split {split!r} has only {len(images)} decodable images; "
                   f"{num_images} requested.")


def to_global_array(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Assembles each host's local batch (a pytree) into global `jax.Array`s.

  Each host's rows fill the slice of the leading axis that its devices own in
  `sharding`, which should split only that (batch) axis, e.g.
  `NamedSharding(mesh, P('data'))`; the global batch is the hosts' together.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
