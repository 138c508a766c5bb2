"""Export to Hugging Face, timm and the official format: parity with transformers, the key lists
of the reference and timm, bitwise round trips, refusals before any write, and a demo run
exported end to end; for pretrained MAEs and for fine-tuned classifiers.
"""
import dataclasses
import functools
import json
import os
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, ViTMAEForPreTraining, ViTMAEModel

import convert_fixtures as fx
from mae_jax import (checkpointing, encode, export, init_params,
                     load_pretrained, mae_apply, unpatchify)
from mae_jax.classifier import Classifier, init_classifier, interpolate_pos_embed
from mae_jax.config import model_config
from mae_jax.data import pipeline
from mae_jax.posemb import sincos_2d
from mae_jax.weights import read, write
from mae_jax.weights.read import Weights
from mae_jax.tasks import make_task
from mae_jax.trainer import train_and_evaluate
from test_convert import IMAGES, NOISE, assert_trees_equal, rel_err, tiny_config
from test_finetune import TINY, finetune_config
from test_train import NO_RECON, config_with


def random_params(config, seed=0):
  """init_params with every leaf moved off its initial value (norms and biases too)."""
  params = init_params(config, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32)
                                   for x in leaves])


CONFIG = tiny_config(layer_norm_eps=1e-6, norm_pix_loss=True)


def export_mae(params, config, dst, fmt, encoder_only=False):
  return write.write(Weights("mae", params, config), fmt, dst, encoder_only)


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


def reference_keys(d, depth, c, p, n, prefix="blocks"):
  """{key: shape} of a ViT encoder as models_mae.py (and timm's VisionTransformer) names it."""
  keys = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d),
          "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,)}
  keys.update(block_keys(d, depth, prefix))
  keys.update({"norm.weight": (d,), "norm.bias": (d,)})
  return keys


def block_keys(d, depth, prefix):
  keys = {}
  for i in range(depth):
    b = f"{prefix}.{i}"
    keys.update({f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,),
                 f"{b}.attn.qkv.weight": (3 * d, d), f"{b}.attn.qkv.bias": (3 * d,),
                 f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
                 f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
                 f"{b}.mlp.fc1.weight": (4 * d, d), f"{b}.mlp.fc1.bias": (4 * d,),
                 f"{b}.mlp.fc2.weight": (d, 4 * d), f"{b}.mlp.fc2.bias": (d,)})
  return keys


def official_keys(d, depth, dd, ddepth, c, p, n):
  """{key: shape} of models_mae.py's MaskedAutoencoderViT.state_dict()."""
  keys = reference_keys(d, depth, c, p, n)
  keys.update({"mask_token": (1, 1, dd), "decoder_pos_embed": (1, n + 1, dd),
               "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,)})
  keys.update(block_keys(dd, ddepth, "decoder_blocks"))
  keys.update({"decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
               "decoder_pred.weight": (p * p * c, dd), "decoder_pred.bias": (p * p * c,)})
  return keys


def test_hf_export_matches_transformers(params, tmp_path):
  export_mae(params, CONFIG, tmp_path / "mae", "hf")
  model, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "mae", output_loading_info=True)
  assert not any(info.values()), info
  loss, logits, mask = fx.pretraining_outputs(model.eval(), IMAGES, NOISE)
  out = mae_apply(params, IMAGES, config=CONFIG, noise=NOISE)
  np.testing.assert_array_equal(np.asarray(out.mask), mask)
  pred_err, loss_err = rel_err(out.pred, logits), abs(float(out.loss) - loss) / abs(loss)
  print(f"pred rel err {pred_err:.2e}, loss rel err {loss_err:.2e}")
  assert pred_err < 1e-4 and loss_err < 1e-4

  # Its image processor: mae_jax's evaluation view (resize 36, crop 32, ImageNet's mean/std).
  processor = AutoImageProcessor.from_pretrained(tmp_path / "mae")
  assert (processor.size["shortest_edge"], processor.crop_size["height"]) == (36, 32)

  export_mae(params, CONFIG, tmp_path / "encoder", "hf", encoder_only=True)
  encoder, info = ViTMAEModel.from_pretrained(tmp_path / "encoder", mask_ratio=0.0,
                                              output_loading_info=True)
  assert not any(info.values()), info
  err = rel_err(encode(params["encoder"], IMAGES, config=CONFIG),
                fx.encoder_outputs(encoder.eval(), IMAGES))
  print(f"encoder rel err {err:.2e}")
  assert err < 1e-4


def test_official_has_the_reference_keys_and_loads_in_torch(params, tmp_path):
  d, p, n = CONFIG.width, CONFIG.patch_size, CONFIG.num_patches
  export_mae(params, CONFIG, tmp_path / "mae.pth", "official")
  export_mae(params, CONFIG, tmp_path / "encoder.pth", "official", encoder_only=True)
  for name, want in [("mae.pth", official_keys(d, 2, 32, 2, 3, p, n)),
                     ("encoder.pth", reference_keys(d, 2, 3, p, n))]:
    checkpoint = torch.load(tmp_path / name, weights_only=True)
    assert list(checkpoint) == ["model"]
    sd = checkpoint["model"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert {v.dtype for v in sd.values()} == {torch.float32}
  # The fixed sin-cos tables, as transformers builds them for the reference's layout.
  torch.testing.assert_close(sd["pos_embed"], fx.hf_sincos(d, CONFIG.grid_size))
  decoder_pos = torch.load(tmp_path / "mae.pth", weights_only=True)["model"]["decoder_pos_embed"]
  torch.testing.assert_close(decoder_pos, fx.hf_sincos(32, CONFIG.grid_size))


def test_timm_has_the_keys_of_its_vision_transformer(params, tmp_path):
  export_mae(params, CONFIG, tmp_path / "timm", "timm", encoder_only=True)
  with safe_open(tmp_path / "timm" / "model.safetensors", "np") as f:
    got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  # timm's VisionTransformer with num_classes=0 (head and fc_norm are Identity: no keys).
  assert got == reference_keys(64, 2, 3, 8, 16)
  with open(tmp_path / "timm" / "config.json") as f:
    meta = json.load(f)
  assert meta["architecture"] == "vit_base_patch16_224" and meta["num_classes"] == 0
  assert meta["model_args"] == dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                    num_heads=4)
  assert meta["pretrained_cfg"]["input_size"] == [3, 32, 32]
  assert meta["global_pool"] == "token" and meta["pretrained_cfg"]["first_conv"] == \
      "patch_embed.proj"
  # The paper's variants by their own names, with nothing to override.
  for variant, name in [("B/16", "vit_base_patch16_224"), ("L/16", "vit_large_patch16_224"),
                        ("H/14", "vit_huge_patch14_224")]:
    meta = write.timm_config(Weights("mae", {}, model_config(variant)))
    assert meta["architecture"] == name and "model_args" not in meta
  large = Weights("mae", {}, model_config("B/16", image_size=448))
  assert write.timm_config(large)["model_args"] == {"img_size": 448}


def test_timm_features_match(params, tmp_path):
  timm = pytest.importorskip("timm", reason="timm is not importable in this project's test "
                                            "environment (it needs torchvision, whose CPU "
                                            "build is missing)")
  export_mae(params, CONFIG, tmp_path / "timm", "timm", encoder_only=True)
  with open(tmp_path / "timm" / "config.json") as f:
    meta = json.load(f)
  model = timm.create_model(
      meta["architecture"], pretrained=True, num_classes=0,
      pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")),
      **meta["model_args"]).eval()
  with torch.no_grad():
    got = model.forward_features(fx.nchw(IMAGES)).numpy()  # [B, 1 + N, D] after the norm
  err = rel_err(got, encode(params["encoder"], IMAGES, config=CONFIG))
  print(f"timm features rel err {err:.2e}")
  assert err < 1e-4


@pytest.mark.parametrize("fmt,encoder_only", [("hf", False), ("hf", True), ("timm", True),
                                              ("official", False), ("official", True)])
def test_round_trip_is_bitwise(params, tmp_path, fmt, encoder_only):
  dst = tmp_path / ("out.pth" if fmt == "official" else "out")
  export_mae(params, CONFIG, dst, fmt, encoder_only)
  src = dst / "model.safetensors" if fmt == "timm" else dst
  got, config = load_pretrained(src, None if fmt == "hf" else CONFIG)
  assert config == CONFIG
  assert_trees_equal(got, {"encoder": params["encoder"]} if encoder_only else params)


def test_official_without_torch_is_the_same_file_format(params, tmp_path, monkeypatch):
  """Where torch is missing, the .pth is written as torch.save's zip, read by both readers."""
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  export_mae(params, CONFIG, tmp_path / "no_torch.pth", "official")
  monkeypatch.undo()
  with zipfile.ZipFile(tmp_path / "no_torch.pth") as z:  # torch.save names entries after the file
    assert z.namelist()[0] == "archive/data.pkl"
  assert_trees_equal(load_pretrained(tmp_path / "no_torch.pth", CONFIG)[0], params)
  export_mae(params, CONFIG, tmp_path / "torch.pth", "official")
  want = torch.load(tmp_path / "torch.pth", weights_only=True)["model"]
  got = torch.load(tmp_path / "no_torch.pth", weights_only=True)["model"]
  assert list(got) == list(want)
  for key in want:
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def listing(path):
  return sorted((os.path.relpath(os.path.join(d, n), path), os.path.getmtime(os.path.join(d, n)))
                for d, _, names in os.walk(path) for n in names)


def test_refusals_come_before_any_write(params, tmp_path, capsys):
  dst = tmp_path / "taken"
  export_mae(params, CONFIG, dst, "hf")
  before = listing(tmp_path)
  with pytest.raises(FileExistsError, match="taken exists; refusing to overwrite"):
    export_mae(params, CONFIG, dst, "official")
  encoder = {"encoder": params["encoder"]}
  eps = tiny_config(layer_norm_eps=1e-12)
  for args, error in [
      ((params, CONFIG, "timm"), "timm's VisionTransformer holds no MAE decoder; pass "
                                 "--encoder_only"),
      ((encoder, CONFIG, "hf"), "the source holds no decoder .* pass --encoder_only"),
      ((encoder, CONFIG, "official"), "the source holds no decoder"),
      ((params, eps, "official"), "layer_norm_eps is 1e-12, but official's model builds its "
                                  "LayerNorms with eps 1e-06"),
      ((encoder, eps, "timm", True), "layer_norm_eps is 1e-12, but timm's"),
      ((params, tiny_config(encoder_mask_tokens=True), "hf"), "encoder_mask_tokens"),
      ((params, CONFIG, "onnx"), "unknown format 'onnx'")]:
    params_, config, fmt, *encoder_only = args
    with pytest.raises(ValueError, match=error):
      export_mae(params_, config, tmp_path / "new", fmt, *encoder_only)
  assert listing(tmp_path) == before

  # The command line: the same checks, each one line on stderr with exit status 1.
  with pytest.raises(SystemExit) as e:
    export.main([str(dst), str(dst), "--format", "hf"])
  err = capsys.readouterr().err
  assert e.value.code == 1 and err == f"error: {dst} exists; refusing to overwrite it\n", err
  with pytest.raises(SystemExit) as e:
    export.main([str(dst), str(tmp_path / "new"), "--format", "timm"])
  assert e.value.code == 1 and "holds no MAE decoder" in capsys.readouterr().err
  assert listing(tmp_path) == before


def test_demo_run_exports_to_transformers(tmp_path, demo_dir):
  """Pretrain the demo briefly, export the workdir, reconstruct the same images in torch."""
  config = config_with(demo_dir, stop_at_step=2, **NO_RECON)
  workdir, dst = str(tmp_path / "run"), str(tmp_path / "hf")
  train_and_evaluate(config, workdir)
  assert export.main([workdir, dst, "--format", "hf"]) == 0
  params, mae_config = load_pretrained(workdir)
  images = pipeline.make_eval_batch(config.input, image_size=mae_config.image_size,
                                    num_images=4)
  noise = np.random.RandomState(1).rand(4, mae_config.num_patches).astype(np.float32)
  want = mae_apply(params, images, config=mae_config, noise=noise)
  model = ViTMAEForPreTraining.from_pretrained(dst).eval()
  loss, logits, mask = fx.pretraining_outputs(model, images, noise)
  np.testing.assert_array_equal(np.asarray(want.mask), mask)
  got_images = unpatchify(logits, mae_config.patch_size)  # [B, H, W, C]
  err = rel_err(got_images, unpatchify(want.pred, mae_config.patch_size))
  print(f"reconstruction rel err {err:.2e}, loss {loss:.4f} vs {float(want.loss):.4f}")
  assert err < 1e-4 and abs(loss - float(want.loss)) < 1e-4 * abs(loss)


# --- Fine-tuned classifiers --------------------------------------------------------------------

LABELS = ["cat", "dog", "owl", "fox", "elk", "yak", "emu", "gnu"]


@functools.cache
def fine_tuned(pool, encoder=TINY, seed=0):
  """A tiny 8-class classifier with every leaf moved off its initial value (the trained
  position embeddings are no sin-cos table); one per arguments, shared by the tests."""
  params = init_classifier(Classifier(encoder, 8, pool), jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  params = jax.tree.unflatten(tree, [np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32)
                                     for x in leaves])
  return Weights("classifier", params, encoder, 8, pool, LABELS)


def classifier_keys(pool, d=64, depth=2, c=3, p=8, n=16, classes=8):
  """{key: shape} of models_vit.py's VisionTransformer(global_pool=pool == 'avg').state_dict()
  (timm's VisionTransformer with global_pool 'avg' / 'token' has the same): the final `norm`
  is deleted for global pooling, which normalises with `fc_norm` instead."""
  keys = reference_keys(d, depth, c, p, n)
  if pool == "avg":
    del keys["norm.weight"], keys["norm.bias"]
    keys.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,)})
  keys.update({"head.weight": (classes, d), "head.bias": (classes,)})
  return keys


def test_classifier_hf_export_gives_the_logits_of_transformers(tmp_path):
  from transformers import ViTForImageClassification
  model = fine_tuned("cls")
  write.write(model, "hf", tmp_path / "hf")
  hf, info = ViTForImageClassification.from_pretrained(tmp_path / "hf",
                                                       output_loading_info=True)
  assert not any(info.values()), info
  assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.num_labels == 8
  with torch.no_grad():
    got = hf.eval()(fx.nchw(IMAGES)).logits.numpy()
  want = Classifier(TINY, 8, "cls").apply({"params": model.params}, IMAGES)
  err = rel_err(want, got)
  print(f"classifier logits rel err {err:.2e}")
  assert err < 1e-4


def test_classifier_official_and_timm_have_the_reference_keys(tmp_path):
  for pool in ("avg", "cls"):
    model = fine_tuned(pool)
    write.write(model, "official", tmp_path / f"{pool}.pth")
    checkpoint = torch.load(tmp_path / f"{pool}.pth", weights_only=True)
    assert list(checkpoint) == ["model"]
    sd = checkpoint["model"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == classifier_keys(pool)
    assert {v.dtype for v in sd.values()} == {torch.float32}
    # The trained position embeddings as they are, not the sin-cos table.
    np.testing.assert_array_equal(sd["pos_embed"].numpy(), model.params["encoder"]["pos_embed"])
    assert not np.allclose(sd["pos_embed"].numpy(), sincos_2d(64, 4, cls_token=True)[None])

    write.write(model, "timm", tmp_path / f"timm_{pool}")
    with safe_open(tmp_path / f"timm_{pool}" / "model.safetensors", "np") as f:
      got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert got == classifier_keys(pool)
    with open(tmp_path / f"timm_{pool}" / "config.json") as f:
      meta = json.load(f)
    timm_pool = {"avg": "avg", "cls": "token"}[pool]
    assert meta["architecture"] == "vit_base_patch16_224" and meta["num_classes"] == 8
    assert meta["global_pool"] == timm_pool and meta["label_names"] == LABELS
    assert meta["pretrained_cfg"]["num_classes"] == 8
    # What timm.create_model gets as arguments: global_pool only where it is not the default.
    want_args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    assert meta["model_args"] == {**want_args, **({"global_pool": "avg"} if pool == "avg"
                                                  else {})}


@pytest.mark.parametrize("fmt,pool", [("hf", "cls"), ("timm", "cls"), ("timm", "avg"),
                                      ("official", "cls"), ("official", "avg")])
def test_classifier_round_trip_through_the_finetune_task_is_bitwise(tmp_path, demo_dir, fmt,
                                                                    pool):
  model = fine_tuned(pool)
  dst = tmp_path / ("out.pth" if fmt == "official" else "out")
  write.write(model, fmt, dst)
  src = str(dst / "model.safetensors" if fmt == "timm" else dst)
  task = make_task(finetune_config(demo_dir, src, pool=pool))
  kind, params = task.load_init(src)
  assert kind == "classifier"
  assert_trees_equal(params, model.params)
  back = read.read(src, num_heads=None if fmt == "hf" else 4)
  assert (back.config, back.num_classes, back.pool) == (TINY, 8, pool)
  assert back.class_names == (LABELS if fmt == "hf" else None)
  assert_trees_equal(back.params, model.params)


def test_a_classifier_of_another_image_size_starts_with_resized_position_embeddings(
    tmp_path, demo_dir):
  model = fine_tuned("cls")
  write.write(model, "official", tmp_path / "ft.pth")
  task = make_task(finetune_config(demo_dir, str(tmp_path / "ft.pth"), pool="cls",
                                   **{"model.image_size": 48}))
  params, _ = task.apply_init(task.load_init(str(tmp_path / "ft.pth")),
                              *task.init(jax.random.key(0)))
  np.testing.assert_array_equal(params["encoder"]["pos_embed"], interpolate_pos_embed(
      model.params["encoder"]["pos_embed"], 6))  # 4 x 4 patches -> 6 x 6
  assert_trees_equal(params["head"], model.params["head"])


def test_classifier_export_command_reads_every_source(tmp_path, capsys):
  """A fine-tuning workdir's best/ (as the trainer's BestCheckpointer writes it), an official
  .pth and a Hugging Face directory, each exported by the command, give the same params."""
  model = fine_tuned("cls")
  best = checkpointing.BestCheckpointer(str(tmp_path / "ft"), "classification/top1")
  best.update(4, {"params": model.params}, {"classification/top1": 0.5},
              {"task": "finetune", "model": {**TINY.to_dict(), "num_classes": 8, "pool": "cls"}})
  best.close()
  steps = [(str(tmp_path / "ft" / "best"), "official.pth", []),
           ("official.pth", "hf", ["--num_heads", "4"]),
           ("hf", "timm", [])]
  for src, dst, flags in steps:
    src = src if os.path.isabs(src) else str(tmp_path / src)
    fmt = "official" if dst.endswith(".pth") else dst
    assert export.main([src, str(tmp_path / dst), "--format", fmt, *flags]) == 0
    out = capsys.readouterr().out
    assert "classifier: 8 classes, pool 'cls'" in out
    if fmt == "timm":  # timm reads config.json: head, sizes, preprocessing
      assert f"timm.create_model('local-dir:{tmp_path / dst}', pretrained=True)" in out
    written = str(tmp_path / dst / "model.safetensors" if fmt == "timm" else tmp_path / dst)
    back = read.read(written, num_heads=4)
    assert_trees_equal(back.params, model.params)
  # Sources that name no classes (a .pth; a workdir from before names were recorded): LABEL_i.
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["id2label"]["7"] == "LABEL_7"
  # A source that says its head count is not overridden by the flag.
  with pytest.raises(SystemExit) as e:
    export.main([steps[0][0], str(tmp_path / "new"), "--format", "official", "--num_heads", "8"])
  assert e.value.code == 1 and "a classifier with num_heads 4, --num_heads says 8" in \
      capsys.readouterr().err
  assert not os.path.exists(tmp_path / "new")


def test_classifier_refusals_come_before_any_write(tmp_path, capsys):
  avg, cls = fine_tuned("avg"), fine_tuned("cls")
  write.write(avg, "official", tmp_path / "avg.pth")
  before = listing(tmp_path)
  with pytest.raises(FileExistsError, match="avg.pth exists; refusing to overwrite"):
    write.write(cls, "timm", tmp_path / "avg.pth")
  with pytest.raises(ValueError, match="gs://b/ft: export writes to a local disk"):
    write.write(cls, "timm", "gs://b/ft")
  eps = fine_tuned("cls", dataclasses.replace(TINY, layer_norm_eps=1e-12))
  for model, fmt, encoder_only, error in [
      (avg, "hf", False, "pools globally .* use --format timm or --format official"),
      (cls, "timm", True, "a fine-tuned classifier; --encoder_only exports an MAE encoder"),
      (eps, "official", False, "layer_norm_eps is 1e-12, but official's model"),
      (eps, "timm", False, "layer_norm_eps is 1e-12, but timm's model"),
      (cls, "onnx", False, "unknown format 'onnx'")]:
    with pytest.raises(ValueError, match=error):
      write.write(model, fmt, tmp_path / "new", encoder_only)
  assert listing(tmp_path) == before

  # The command line: one line naming the problem, exit status 1, nothing written.
  src = str(tmp_path / "avg.pth")
  for flags, error in [(["--format", "hf", "--num_heads", "4"], "pools globally"),
                       (["--format", "timm", "--num_heads", "4", "--encoder_only"],
                        "--encoder_only exports"),
                       (["--format", "timm", "--num_heads", "4", "--width", "64"],
                        "--width cannot apply"),
                       (["--format", "timm"], "width 64 is none of the paper's variants "
                                              "([192, 384, 768, 1024, 1280]), so its head "
                                              "count is unknown; pass --num_heads")]:
    with pytest.raises(SystemExit) as e:
      export.main([src, str(tmp_path / "new"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 1 and error in err and err.count("\n") == 1, err
  assert listing(tmp_path) == before
