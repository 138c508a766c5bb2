"""Input pipeline: sources, decoding, augmentation, sharding, resume, demo data, global arrays."""
import io
import os
import threading

from grain.experimental import index_shuffle
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mae_jax.data import demo, pipeline, sources, transforms

MEAN = np.array(transforms.IMAGENET_MEAN, np.float32)
STD = np.array(transforms.IMAGENET_STD, np.float32)


def _config(**fields):
  return ml_collections.ConfigDict(fields)


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _pixels(normalised):
  """Undoes Normalize: float images back to 0..255 values."""
  return (normalised * STD + MEAN) * 255


@pytest.fixture
def odd_folder(tmp_path):
  """One image in each awkward mode, all 40x30, plus one corrupt file."""
  d = tmp_path / "train" / "odd"
  d.mkdir(parents=True)
  Image.new("L", (40, 30), 77).save(d / "gray.png")
  Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(d / "cmyk.jpg", quality=95)
  Image.new("RGBA", (40, 30), (10, 20, 30, 0)).save(d / "rgba.png")
  Image.new("LA", (40, 30), (60, 128)).save(d / "gray_alpha.png")
  palette = Image.new("P", (40, 30), 0)
  palette.putpalette([200, 100, 50] * 256)
  palette.save(d / "palette.png")
  Image.fromarray(np.full((30, 40), 257 * 100, np.uint16)).save(d / "sixteen_bit.png")
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  return tmp_path


EXPECTED_RGB = {"gray.png": (77, 77, 77), "cmyk.jpg": (255, 255, 255), "rgba.png": (10, 20, 30),
                "gray_alpha.png": (60, 60, 60), "palette.png": (200, 100, 50),
                "sixteen_bit.png": (100, 100, 100)}


@pytest.fixture
def noise_folder(tmp_path):
  """12 random-noise images of different sizes in two classes."""
  rng = np.random.default_rng(0)
  for i in range(12):
    d = tmp_path / "train" / f"class{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    shape = (40 + 3 * i, 56 - 2 * i, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / f"{i}.png")
  return tmp_path


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
  """Builds the demo data twice at once, as concurrent processes would."""
  cache = str(tmp_path_factory.mktemp("demo_cache"))
  roots = []
  threads = [threading.Thread(target=lambda: roots.append(demo.build_demo(cache)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(roots) == 2 and roots[0] == roots[1]
  return cache


# ---------------------------------------------------------------- decoding and skipping


def test_imagenet_statistics_are_one_definition_exported_at_the_top():
  import mae_jax
  from configs import base
  assert mae_jax.IMAGENET_MEAN == (0.485, 0.456, 0.406)
  assert mae_jax.IMAGENET_STD == (0.229, 0.224, 0.225)
  assert transforms.IMAGENET_MEAN is mae_jax.IMAGENET_MEAN is base.IMAGENET_MEAN
  assert transforms.IMAGENET_STD is mae_jax.IMAGENET_STD is base.IMAGENET_STD


def test_folder_decodes_every_mode_to_rgb_and_skips_the_corrupt_file(odd_folder):
  source = sources.folder_source(str(odd_folder))
  assert len(source) == 7 and source.classes == ["odd"]
  decode = transforms.DecodeImage()
  skipped = 0
  for i in range(len(source)):
    record = source[i]
    image = decode.map(record)["image"]
    if image is None:
      skipped += 1
      assert record["file_name"] == "odd/corrupt.jpg"
      continue
    assert image.dtype == np.uint8 and image.shape == (30, 40, 3)
    expected = EXPECTED_RGB[os.path.basename(record["file_name"])]
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), expected, atol=2)
  assert skipped == 1


def test_loader_over_bad_folder_reports_exactly_one_skip(odd_folder):
  config = _config(dataset="folder", data_dir=str(odd_folder), hflip=False)
  loader = pipeline.make_train_loader(config, image_size=32, global_batch_size=7, seed=3)
  batch = next(iter(loader))  # Global positions 0-6: the first epoch, each record once.
  assert batch["image"].shape == (7, 32, 32, 3) and batch["image"].dtype == np.float32
  source = sources.folder_source(str(odd_folder))
  corrupt = source.paths.index("odd/corrupt.jpg")
  records = [pipeline.record_at(g, 7, 3) for g in range(7)]
  assert sorted(records) == list(range(7))
  # The corrupt record's position holds the next record of the source, counted as a skip.
  assert batch["skipped"].tolist() == [int(r == corrupt) for r in records]
  at = records.index(corrupt)
  crop = transforms.RandomResizedCrop(32, (0.2, 1.0), (3 / 4, 4 / 3))
  replacement = transforms.DecodeImage().map(source[(corrupt + 1) % 7])
  want = crop.random_map(replacement, pipeline.example_rng(3, at))["image"]
  np.testing.assert_allclose(_pixels(batch["image"][at]), want, atol=1e-3)


def test_decode_arrays_and_rejects_truncated_bytes():
  gray = np.full((5, 6, 1), 9, np.uint8)
  np.testing.assert_array_equal(transforms.decode_rgb(gray), np.full((5, 6, 3), 9))
  rgba = np.zeros((5, 6, 4), np.uint8)
  rgba[..., 3] = 255
  assert transforms.decode_rgb(rgba).shape == (5, 6, 3)
  np.testing.assert_array_equal(transforms.decode_rgb(np.full((2, 2), 65535, np.uint16)), 255)
  buf = io.BytesIO()
  Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
  with pytest.raises(OSError):
    transforms.decode_rgb(buf.getvalue()[:len(buf.getvalue()) // 2])
  assert transforms.DecodeImage().map({"image": b"garbage"}) == {"image": None}


# ---------------------------------------------------------------- augmentation


def test_random_resized_crop_box_respects_scale_and_ratio():
  height, width = 800, 1000
  boxes = [transforms.random_resized_crop_box(height, width, np.random.default_rng(s))
           for s in range(300)]
  areas, ratios = [], []
  for top, left, h, w in boxes:
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  assert 0.2 - 0.01 <= min(areas) and max(areas) <= 1.0
  assert 0.75 - 0.01 <= min(ratios) and max(ratios) <= 4 / 3 + 0.01
  assert np.ptp(areas) > 0.5 and len(set(boxes)) == len(boxes)
  # No sample fits a 10-pixel-high strip: torchvision's centred fallback.
  rng = np.random.default_rng(0)
  assert transforms.random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 13)
  assert transforms.random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)


def test_random_resized_crop_is_seeded_and_resizes_the_box_bicubically():
  image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
  crop = transforms.RandomResizedCrop(32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
  out = crop.random_map({"image": image}, np.random.default_rng(5))["image"]
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  again = crop.random_map({"image": image}, np.random.default_rng(5))["image"]
  other = crop.random_map({"image": image}, np.random.default_rng(6))["image"]
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, other)
  top, left, h, w = transforms.random_resized_crop_box(64, 48, np.random.default_rng(5))
  expected = Image.fromarray(image).crop((left, top, left + w, top + h))
  np.testing.assert_array_equal(out, np.asarray(expected.resize((32, 32), Image.BICUBIC)))


def _jpeg(array, quality=90):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _photo_like(height, width):
  """Smooth colour gradients with some texture: what DCT scaling is made for."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  image = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y), np.sin(9 * x * y)], -1)
  noise = np.random.default_rng(0).normal(0, 0.05, image.shape)
  return np.clip((image + noise + 1) * 127.5, 0, 255).astype(np.uint8)


def test_draft_decode_reduces_only_jpegs_with_pixels_to_spare():
  # Every RandomResizedCrop box (area >= 0.2, aspect in [3/4, 4/3]) of a 27307-pixel image
  # is >= 64 on its short side: sqrt(0.2 * 27307 * 3 / 4) = 64.0.
  min_pixels = transforms.draft_min_pixels(64, (0.2, 1.0), (3 / 4, 4 / 3))
  assert min_pixels == 27307
  # Aspect 1/2 makes the short side sqrt(0.2 * A / 2): 64 needs A >= 40960.
  assert transforms.draft_min_pixels(64, (0.2, 1.0), (1 / 2, 4 / 3)) == 40960
  photo = _photo_like(720, 960)
  full = transforms.decode_rgb(_jpeg(photo))
  reduced = transforms.decode_rgb(_jpeg(photo), min_pixels)
  assert reduced.shape == (180, 240, 3)  # 1/4: 240 x 180 = 43200 pixels; 1/8 has 10800
  # Close to an area-average of the full decode (mean error about one grey level).
  average = full.reshape(180, 4, 240, 4, 3).mean((1, 3))
  assert np.abs(reduced - average).mean() < 2.0
  # Small JPEGs and other formats decode at full size, bit for bit.
  small = photo[:150, :200]
  np.testing.assert_array_equal(transforms.decode_rgb(_jpeg(small), min_pixels),
                                transforms.decode_rgb(_jpeg(small)))
  assert transforms.decode_rgb(_png(photo), min_pixels).shape == (720, 960, 3)
  boxes = [transforms.random_resized_crop_box(180, 240, np.random.default_rng(s))
           for s in range(300)]
  assert min(min(h, w) for _, _, h, w in boxes) >= 64


def _pil_rgb(data, draft_scale=1):
  """PIL's own decode (and draft), as torchvision's loader does it."""
  with Image.open(io.BytesIO(data)) as pil:
    if draft_scale > 1:
      pil.draft(None, (pil.size[0] // draft_scale, pil.size[1] // draft_scale))
    return np.asarray(pil.convert("RGB"))


def test_jpegs_decode_to_pils_pixels_at_full_and_reduced_size():
  photo = Image.fromarray(_photo_like(203, 301))  # odd sizes: partial MCUs at the edges
  kinds = {"4:2:0": dict(), "4:2:2": dict(subsampling=1), "4:4:4": dict(subsampling=0),
           "progressive": dict(progressive=True), "grayscale": dict(mode="L"),
           "CMYK": dict(mode="CMYK")}
  min_pixels = 7000  # 1/2 size: 151 x 102 = 15402 pixels; 1/4: 76 x 51 = 3876
  for kind, options in kinds.items():
    buf = io.BytesIO()
    photo.convert(options.pop("mode", "RGB")).save(buf, format="JPEG", quality=90, **options)
    data = buf.getvalue()
    # simplejpeg decodes all but CMYK (PIL's conversion of which it would not match).
    assert (transforms._decode_jpeg(data, 0) is None) == (kind == "CMYK"), kind
    np.testing.assert_array_equal(transforms.decode_rgb(data), _pil_rgb(data), err_msg=kind)
    np.testing.assert_array_equal(transforms.decode_rgb(data, min_pixels), _pil_rgb(data, 2),
                                  err_msg=kind)
  assert transforms._decode_jpeg(_png(_photo_like(20, 30)), 0) is None


def test_jpegs_past_pils_pixel_limit_are_skipped_as_before(monkeypatch):
  """PIL refuses decompression bombs; the fast decoder must not decode them instead."""
  data = _jpeg(_photo_like(60, 80))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 80 // 2 - 1)
  assert transforms.DecodeImage().map({"image": data}) == {"image": None}


def test_draft_decode_is_an_option_of_the_loader(tmp_path):
  d = tmp_path / "train" / "a"
  d.mkdir(parents=True)
  (d / "big.jpg").write_bytes(_jpeg(_photo_like(720, 960)))
  batches = {}
  for draft in (False, True):
    loader = pipeline.make_train_loader(
        _config(dataset="folder", data_dir=str(tmp_path), draft_decode=draft),
        image_size=64, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batches[draft] = _pixels(next(iter(loader))["image"])
  difference = np.abs(batches[True] - batches[False])
  assert 0 < difference.mean() < 3.0  # same crops, slightly different pixels


def test_uint8_batches_are_the_reference_pixels_and_normalise_on_the_device(tmp_path):
  d = tmp_path / "train" / "a"
  d.mkdir(parents=True)
  photo = _photo_like(90, 120)
  for i in range(6):
    (d / f"{i}.jpg").write_bytes(_jpeg(np.roll(photo, 7 * i, axis=1)))
  base = dict(dataset="folder", data_dir=str(tmp_path))
  kwargs = dict(image_size=32, global_batch_size=6, seed=4, process_index=0, process_count=1)
  host = next(iter(pipeline.make_train_loader(_config(**base), **kwargs)))["image"]
  config = _config(**base, normalize_on_device=True)
  pixels = next(iter(pipeline.make_train_loader(config, **kwargs)))["image"]
  assert pixels.dtype == np.uint8 and pixels.shape == (6, 32, 32, 3)
  # Position k holds record shuffle_4(k) of the first epoch, augmented the plain way (an
  # array, cropped, resized, flipped) with the rng of (seed 4, position k): Philox keyed by
  # seed * 2**64 + position.
  source = sources.folder_source(str(tmp_path))
  for k in range(6):
    rng = np.random.Generator(np.random.Philox(key=4 * 2**64 + k))
    image = transforms.decode_rgb(source[index_shuffle(k, max_index=5, seed=4, rounds=4)]["image"])
    top, left, h, w = transforms.random_resized_crop_box(90, 120, rng)
    want = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize((32, 32),
                                                                                 Image.BICUBIC))
    np.testing.assert_array_equal(pixels[k], want[:, ::-1] if rng.random() < 0.5 else want)
  on_device = jax.jit(lambda x: pipeline.device_images(x, config))
  np.testing.assert_allclose(np.asarray(on_device(pixels)), host, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(on_device(host)), host)  # float passes through
  with pytest.raises(ValueError, match="normalize_on_device=True cannot be combined with "
                                       "input.reprob=0.25"):
    pipeline.make_train_loader(_config(**base, normalize_on_device=True, reprob=0.25), **kwargs)


def test_horizontal_flip_mirrors_about_half_the_time():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  flip = transforms.RandomHorizontalFlip()
  flipped = 0
  for seed in range(100):
    out = flip.random_map({"image": image}, np.random.default_rng(seed))["image"]
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 30 < flipped < 70


def test_normalize_uses_imagenet_mean_and_std():
  image = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 128, 255)], axis=-1)
  out = transforms.Normalize().map({"image": image})["image"]
  assert out.dtype == np.float32
  expected = (np.array([0, 128, 255]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
  custom = transforms.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3).map({"image": image})["image"]
  np.testing.assert_allclose(custom[0, 0], [-1, 128 / 127.5 - 1, 1], atol=1e-6)


def test_resize_center_crop_keeps_the_middle():
  image = np.zeros((40, 120, 3), np.uint8)
  image[:, 50:70] = 255  # Resized to 32x96 and cropped to columns 32:64, this is 8:24.
  out = transforms.ResizeCenterCrop(32).map({"image": image})["image"]
  assert out.shape == (32, 32, 3)
  assert out[:, 10:22].min() > 240 and out[:, :6].max() < 15 and out[:, -6:].max() < 15


# ---------------------------------------------------------------- loader: sharding and resume


def test_hosts_read_disjoint_parts_of_the_same_global_batches(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(16):  # Red identifies the record; green and blue noise shows the crop.
    d = tmp_path / "train" / f"c{i % 4}"
    d.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (20, 24 + i, 3), dtype=np.uint8)
    image[..., 0] = 10 * (i + 1)
    Image.fromarray(image).save(d / f"{i}.png")
  config = _config(dataset="folder", data_dir=str(tmp_path))

  def batches(process_index, process_count):
    it = iter(pipeline.make_train_loader(config, image_size=16, global_batch_size=8, seed=0,
                                         process_index=process_index,
                                         process_count=process_count))
    return [next(it)["image"] for _ in range(3)]

  one = batches(0, 1)
  for hosts in (2, 4):
    parts = [batches(p, hosts) for p in range(hosts)]
    assert parts[0][0].shape == (8 // hosts, 16, 16, 3)
    for k in range(3):  # host p holds rows p*B/P ... of global batch k, whatever P is
      assert np.concatenate([part[k] for part in parts]).tobytes() == one[k].tobytes()
  values = np.round(_pixels(np.concatenate(one[:2]))[:, 8, 8, 0] / 10).astype(int)
  assert sorted(values) == list(range(1, 17))  # the first epoch: every record once


def test_global_batch_must_divide_by_process_count(odd_folder):
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_loader(_config(dataset="folder", data_dir=str(odd_folder)),
                               image_size=32, global_batch_size=10, seed=0,
                               process_index=0, process_count=4)


def test_a_loader_started_at_batch_k_continues_the_sequence(noise_folder):
  config = _config(dataset="folder", data_dir=str(noise_folder))
  kwargs = dict(image_size=16, global_batch_size=5, seed=7)
  it = iter(pipeline.make_train_loader(config, **kwargs))
  first = [next(it) for _ in range(3)]
  expected = [next(it) for _ in range(2)]
  resumed = iter(pipeline.make_train_loader(config, start_batch=3, **kwargs))
  for want, got in zip(expected, [next(resumed) for _ in range(2)]):
    for key in ("image", "skipped"):
      assert want[key].tobytes() == got[key].tobytes()
  # The stream crosses the epoch boundary (12 records) without repeating inside an epoch.
  epoch = np.concatenate([b["image"] for b in first[:2]] + [first[2]["image"][:2]])
  assert len({x.tobytes() for x in epoch}) == 12
  other_seed = next(iter(pipeline.make_train_loader(config, **{**kwargs, "seed": 8})))
  assert not np.array_equal(other_seed["image"], first[0]["image"])


def test_worker_processes_produce_the_same_batches(noise_folder):
  def first_batches(worker_count):
    config = _config(dataset="folder", data_dir=str(noise_folder), worker_count=worker_count)
    it = iter(pipeline.make_train_loader(config, image_size=16, global_batch_size=4, seed=1))
    return [next(it)["image"].tobytes() for _ in range(3)]

  # Each worker builds whole batches (batch k from positions 4k ... 4k + 3 alone), so the
  # batches are the same, in the same order, for any worker count.
  assert first_batches(2) == first_batches(0)


def test_read_threads_and_buffer_change_how_records_are_read_not_which(noise_folder):
  """Read threads (and the evaluation loader's read-ahead) are speed settings: the batches
  are the same; in-memory sources read without threads, files with 16, unless the config
  says otherwise."""
  def batches(**fields):
    config = _config(dataset="folder", data_dir=str(noise_folder), **fields)
    it = iter(pipeline.make_train_loader(config, image_size=16, global_batch_size=4, seed=1))
    return [next(it)["image"].tobytes() for _ in range(4)]

  assert batches(read_threads=0) == batches() == batches(read_threads=3)
  folder = _config(dataset="folder", data_dir=str(noise_folder))
  assert pipeline.read_options(folder, sources.folder_source(str(noise_folder))) == (
      pipeline.grain.ReadOptions(num_threads=16, prefetch_buffer_size=64))
  digits = _config(dataset="digits")
  assert pipeline.read_options(digits, sources.DigitsSource("test")).num_threads == 0
  digits.read_threads = 2
  assert pipeline.read_options(digits, sources.DigitsSource("test")).num_threads == 2


# ---------------------------------------------------------------- demo data


def test_demo_dataset_is_real_photographs(demo_cache):
  root = demo.build_demo(demo_cache)  # Already built: returns at once.
  assert sorted(os.listdir(demo_cache)) == [os.path.basename(root)]  # No temp dirs left.
  train = sources.demo_source("train", cache_dir=demo_cache)
  val = sources.demo_source("val", cache_dir=demo_cache)
  assert len(train) == len(demo.PHOTOS) * demo.TRAIN_CROPS_PER_PHOTO >= 300
  assert len(val) == len(demo.PHOTOS) * demo.VAL_CROPS_PER_PHOTO
  assert train.classes == sorted(demo.PHOTOS)
  colourful = 0
  for i in range(0, len(train), 37):
    image = transforms.decode_rgb(train[i]["image"])
    assert image.shape == (demo.CROP_PIXELS, demo.CROP_PIXELS, 3)
    assert image.std() > 5
    colourful += np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 5
  assert colourful >= 5


def test_demo_loader_and_eval_batch(demo_cache):
  config = _config(dataset="demo", data_dir=demo_cache)
  batch = next(iter(pipeline.make_train_loader(config, image_size=32, global_batch_size=8,
                                               seed=0)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["skipped"].sum() == 0
  assert np.abs(batch["image"].mean()) < 1.5 and batch["image"].std() > 0.3
  evals = pipeline.make_eval_batch(config, image_size=32, num_images=8)
  assert evals.shape == (8, 32, 32, 3) and evals.dtype == np.float32
  np.testing.assert_array_equal(evals, pipeline.make_eval_batch(config, image_size=32,
                                                                num_images=8))
  assert len({x.tobytes() for x in evals}) == 8


# ---------------------------------------------------------------- tfds


class MaeJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """Tiny tfds dataset, written without TensorFlow by storing PNG bytes directly."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                           "label": tfds.features.ClassLabel(num_classes=2)})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      image = _png(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
      yield i, {"image": b"corrupt" if i == 1 else image, "label": i % 2}


def test_tfds_dataset_is_read_without_tensorflow(tmp_path):
  MaeJaxTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config(dataset="mae_jax_test_images", data_dir=str(tmp_path))
  it = iter(pipeline.make_train_loader(config, image_size=16, global_batch_size=5, seed=0))
  batches = [next(it) for _ in range(3)]  # positions 0-14 of 6 records: 2.5 epochs
  assert batches[0]["image"].shape == (5, 16, 16, 3)
  # One record is corrupt: one skip in each of epochs 0 and 1, and one in epoch 2 if its
  # shuffle (grain's index_shuffle, seed 0 + 2) puts it among that epoch's first three.
  source = sources.tfds_source("mae_jax_test_images", "train", str(tmp_path))
  decode = transforms.DecodeImage()
  [corrupt] = [i for i in range(6) if decode.map(source[i])["image"] is None]
  epoch_2 = [index_shuffle(i, max_index=5, seed=2, rounds=4) for i in range(6)]
  assert sum(b["skipped"].sum() for b in batches) == 2 + (epoch_2.index(corrupt) < 3)
  evals = pipeline.make_eval_batch(config, image_size=16, num_images=2)
  assert evals.shape == (2, 16, 16, 3)


def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    pipeline.make_train_loader(_config(dataset="imagenet2012", data_dir=str(tmp_path)),
                               image_size=32, global_batch_size=8, seed=0)
  message = str(error.value)
  assert "imagenet2012" in message and str(tmp_path) in message
  assert "tfds build imagenet2012" in message and "--manual_dir" in message
  with pytest.raises(FileNotFoundError, match="cifar10"):
    sources.tfds_source("cifar10", "train", str(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.folder_source(str(tmp_path / "nowhere"))
  (tmp_path / "train" / "empty_class").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no images"):
    sources.folder_source(str(tmp_path))


# ---------------------------------------------------------------- global arrays


def test_to_global_array_shards_the_batch_over_devices():
  devices = jax.devices()
  sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
  n = 2 * len(devices)
  local = {"image": np.arange(n * 4 * 4 * 3, dtype=np.float32).reshape(n, 4, 4, 3),
           "skipped": np.arange(n, dtype=np.int32)}
  out = pipeline.to_global_array(local, sharding)
  for key, value in local.items():
    assert isinstance(out[key], jax.Array) and out[key].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[key]), value)
    shards = out[key].addressable_shards
    assert len(shards) == len(devices)
    for shard in shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
      assert shard.data.shape[0] == 2
