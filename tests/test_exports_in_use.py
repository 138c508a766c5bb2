"""Exports as their users meet them: a classifier fine-tuned on an image folder with named
classes, exported, classifies image files through `transformers.pipeline` under the folder's
names as mae_jax's own evaluation does; its image processor is mae_jax's evaluation view; a
linear probe exports as a classifier with the probe's logits; timm gets the same view."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from configs import finetune, linear_probe
from mae_jax import export
from mae_jax.classifier import Classifier
from mae_jax.data import pipeline, sources, transforms
from mae_jax.mae import init_encoder_params
from mae_jax.tasks import make_task
from mae_jax.trainer import train_and_evaluate
from mae_jax.weights import preprocess, read, write

from test_eval import ENCODER
from test_train import set_fields

CLASSES = ["cherry", "lime", "plum", "sky"]  # sorted, as image-folder labels are
COLOURS = {"cherry": (200, 30, 40), "lime": (60, 200, 40), "plum": (110, 40, 120),
           "sky": (90, 160, 230)}
MEAN, STD = (0.45, 0.4, 0.35), (0.3, 0.28, 0.27)  # the run's own, not ImageNet's
VAL_PER_CLASS = 26  # 104 images: one disagreement would still be >= 99%


def image_sizes(rng, n):
  """(height, width) pairs of varied shapes for which transformers' centre crop (offset
  floored) and torchvision's (rounded) agree: the resized side's excess over the 32-pixel crop
  is not 3 mod 4 (test_image_processor_is_the_evaluation_view shows the other case)."""
  out = []
  while len(out) < n:
    h, w = rng.randint(24, 90, size=2)
    long = int(pipeline.eval_resize(32) * max(h, w) / min(h, w))
    if (long - 32) % 4 != 3:
      out.append((int(h), int(w)))
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{train,val}/<colour word>/<n>.png: noisy patches of each class's colour."""
  root = tmp_path_factory.mktemp("colours")
  rng = np.random.RandomState(0)
  for split, per_class in (("train", 8), ("val", VAL_PER_CLASS)):
    for name in CLASSES:
      os.makedirs(root / split / name)
      for i, (h, w) in enumerate(image_sizes(rng, per_class)):
        pixels = np.asarray(COLOURS[name]) + rng.randint(-60, 60, size=(h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            root / split / name / f"{i}.png")
  return str(root)


def folder_config(module, folder, **extra):
  config = module.get_config().unlock()
  config.model.update(**ENCODER)
  config.input.update(dataset="folder", data_dir=str(folder), eval_split="val", worker_count=0,
                      mean=MEAN, std=STD)
  config.evals.classification.update(every_steps=0, batch_size=8)
  return set_fields(config.lock(), **{
      "num_classes": len(CLASSES), "init_from": "random", "batch_size": 8, "total_steps": 4,
      "warmup_steps": 1, "log_every_steps": 2, "checkpoint_every_steps": 2, "pool": "cls",
      **extra})


@pytest.fixture(scope="module")
def finetuned(folder, tmp_path_factory):
  """A tiny pool='cls' classifier fine-tuned for 4 steps on the folder, exported to hf."""
  config = folder_config(finetune, folder, best_metric=None, lr=1e-3)
  workdir = str(tmp_path_factory.mktemp("ft") / "run")
  train_and_evaluate(config, workdir)
  dst = str(tmp_path_factory.mktemp("ft_hf") / "hf")
  assert export.main([workdir, dst, "--format", "hf"]) == 0
  return config, workdir, dst


def val_files(folder):
  source = sources.folder_source(folder, "val")
  return source, [os.path.join(folder, "val", p) for p in source.paths]


def mae_jax_view(config, source):
  """Every val image as mae_jax's evaluation sees it: [N, 32, 32, 3] and the labels."""
  batches = list(pipeline.make_eval_loader(config.input, "val", image_size=32,
                                           global_batch_size=8, process_index=0,
                                           process_count=1, source=source))
  valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
  images = np.concatenate([b["image"] for b in batches])[valid]
  return images, np.concatenate([b["label"] for b in batches])[valid]


def test_checkpoints_record_the_class_names_and_exports_carry_them(finetuned):
  _, workdir, dst = finetuned
  assert read.read(workdir).class_names == CLASSES
  with open(os.path.join(dst, "config.json")) as f:
    meta = json.load(f)
  assert meta["id2label"] == {str(i): n for i, n in enumerate(CLASSES)}
  assert meta["label2id"] == {n: i for i, n in enumerate(CLASSES)}
  assert sources.class_names(sources.DigitsSource("test")) == [str(i) for i in range(10)]
  # A Hugging Face export read back keeps the names and the run's normalisation.
  back = read.read(dst)
  assert back.class_names == CLASSES and back.view == preprocess.View(32, MEAN, STD)


def test_tfds_sources_name_their_classes():
  import tensorflow_datasets as tfds

  class Source:  # what tfds' data sources carry
    dataset_info = types.SimpleNamespace(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=CLASSES)}))

  assert sources.class_names(Source()) == CLASSES


def test_transformers_pipeline_classifies_files_as_mae_jax_evaluates(finetuned, folder):
  import transformers
  config, workdir, dst = finetuned
  source, files = val_files(folder)
  classify = transformers.pipeline("image-classification", model=dst)
  outputs = classify(files, top_k=len(CLASSES))  # per file: every label, best first
  got = [out[0]["label"] for out in outputs]
  weights = read.read(workdir)
  images, _ = mae_jax_view(config, source)
  logits = Classifier(weights.config, len(CLASSES), "cls").apply({"params": weights.params},
                                                                 images)
  want = [CLASSES[i] for i in np.argmax(logits, -1)]
  agree = np.mean([g == w for g, w in zip(got, want)])
  # The probabilities too: a small shift of the inputs (another mean) can keep the labels.
  scores = np.array([[{o["label"]: o["score"] for o in out}[c] for c in CLASSES]
                     for out in outputs])
  err = np.abs(scores - jax.nn.softmax(logits)).max()
  print(f"{len(files)} files, predictions {sorted(set(got))}, agreement {agree:.1%}, "
        f"probabilities within {err:.1e}")
  assert len(got) == len(files) >= 100 and set(got) <= set(CLASSES)
  assert agree >= 0.99 and err < 1e-4


def test_image_processor_is_the_evaluation_view(finetuned, folder):
  from transformers import AutoImageProcessor
  config, _, dst = finetuned
  processor = AutoImageProcessor.from_pretrained(dst)
  source, files = val_files(folder)
  want, _ = mae_jax_view(config, source)
  got = np.stack([processor(Image.open(f), return_tensors="np")["pixel_values"][0]
                  for f in files]).transpose(0, 2, 3, 1)  # [N, H, W, C]
  err = np.abs(got - want).max()
  print(f"{len(files)} files, max pixel difference {err:.2e} (normalised units)")
  assert err < 1e-5  # the same PIL resize; float32 normalisation in both
  # The one difference: an excess of 3 mod 4 pixels over the crop (36 x 39: 7), where
  # transformers floors the centre offset (3) and torchvision and mae_jax round it (4).
  image = np.random.RandomState(1).randint(0, 256, (36, 39, 3)).astype(np.uint8)
  ours = transforms.ResizeCenterCrop(32, pipeline.eval_resize(32)).map({"image": image})["image"]
  theirs = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
  scale, offset = transforms.normalize_constants(MEAN, STD)
  theirs = np.round((theirs.transpose(1, 2, 0) + offset) / scale)
  np.testing.assert_array_equal(theirs[:, 1:], ours[:, :-1])


def test_file_modes_follow_the_umask(finetuned):
  _, _, dst = finetuned
  modes = {n: os.stat(os.path.join(dst, n)).st_mode & 0o777 for n in os.listdir(dst)}
  assert set(modes) == {"config.json", "model.safetensors", "preprocessor_config.json"}
  assert len(set(modes.values())) == 1, modes


def probe_state(pool, seed=0):
  """A probe's (params, model_state) with every statistic away from its initial value."""
  task = make_task(set_fields(folder_config(linear_probe, "/unused"), pool=pool))
  rng = np.random.RandomState(seed)
  d, c = ENCODER["width"], len(CLASSES)
  head = {"kernel": rng.randn(d, c).astype(np.float32), "bias": rng.randn(c).astype(np.float32)}
  stats = {"mean": rng.randn(d).astype(np.float32),
           "var": (0.5 + rng.rand(d)).astype(np.float32)}
  encoder = init_encoder_params(task.encoder, jax.random.key(seed))
  return task, {"head": head}, {"encoder": encoder, "batch_stats": stats}


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_probe_folds_into_a_classifier_with_its_logits(pool):
  task, params, state = probe_state(pool)
  folded = read.probe_classifier(state["encoder"], params["head"], state["batch_stats"],
                                 task.encoder, pool)
  images = jnp.asarray(np.random.RandomState(2).randn(4, 32, 32, 3).astype(np.float32))
  want = task.logits(params, state, images)
  got = Classifier(task.encoder, len(CLASSES), pool).apply({"params": folded}, images)
  err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  print(f"pool {pool}: folded logits rel err {err:.2e}")
  assert err < 1e-5


@pytest.fixture(scope="module")
def probe(folder, tmp_path_factory):
  config = folder_config(linear_probe, folder)
  workdir = str(tmp_path_factory.mktemp("probe") / "run")
  state = train_and_evaluate(config, workdir)
  return config, workdir, state


def test_probe_workdir_exports_with_the_probe_logits(probe, folder, tmp_path, capsys):
  from transformers import ViTForImageClassification
  config, workdir, state = probe
  dst = str(tmp_path / "hf")
  assert export.main([workdir, dst, "--format", "hf"]) == 0
  assert "its BatchNorm folded into the head" in capsys.readouterr().out
  images, _ = mae_jax_view(config, val_files(folder)[0])
  task = make_task(config)
  want = np.asarray(task.logits(state["params"], state["model_state"], jnp.asarray(images)))
  model = ViTForImageClassification.from_pretrained(dst).eval()
  assert model.config.id2label == dict(enumerate(CLASSES))
  with torch.no_grad():
    got = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits.numpy()
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"exported probe logits rel err {err:.2e}")
  assert err < 1e-4


def import_timm():
  """timm, if this environment can import it (the project does not install it: it needs
  torchvision, which has no CPU build here)."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import timm.data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"timm is not importable in this project's test environment ({e})")
  return timm


def test_timm_export_carries_the_view_and_the_labels(tmp_path):
  timm = import_timm()
  task, params, state = probe_state("avg")
  folded = read.probe_classifier(state["encoder"], params["head"], state["batch_stats"],
                                 task.encoder, "avg")
  weights = read.Weights("classifier", folded, task.encoder, len(CLASSES), "avg", CLASSES,
                         preprocess.View(32, MEAN, STD))
  dst = write.write(weights, "timm", tmp_path / "timm")
  model = timm.create_model(f"local-dir:{dst}", pretrained=True).eval()
  assert model.pretrained_cfg["label_names"] == CLASSES
  view = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
  rng = np.random.RandomState(3)
  images = [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in image_sizes(rng, 6)]
  want = np.stack([transforms.Normalize(MEAN, STD).map(transforms.ResizeCenterCrop(
      32, pipeline.eval_resize(32)).map({"image": x}))["image"] for x in images])
  got = np.stack([view(Image.fromarray(x)).numpy() for x in images]).transpose(0, 2, 3, 1)
  assert np.abs(got - want).max() < 1e-5
  with torch.no_grad():
    logits = model(torch.from_numpy(want.transpose(0, 3, 1, 2).copy())).numpy()
  expected = task.logits(params, state, jnp.asarray(want))
  assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4
