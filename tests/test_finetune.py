"""Fine-tuning: the classifier (drop path, trained position embeddings and their
interpolation), fine-tuned checkpoints against reference forwards, layer-wise lr decay,
Mixup / CutMix, the task through the trainer, and errors before any write."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from PIL import Image
from scipy.special import erf

from configs import finetune
from mae_jax import classifier, optim
from mae_jax.classifier import Classifier, init_classifier, interpolate_pos_embed
from mae_jax.config import ViTConfig
from mae_jax.mae import _encode, init_encoder_params
from mae_jax.mixup import mix_batch
from mae_jax.models import drop_path
from mae_jax.posemb import sincos_2d
from mae_jax.tasks import make_task
from mae_jax.tasks.finetune import decay_mask, lr_scales
from mae_jax.trainer import train_and_evaluate

from test_eval import ENCODER, set_fields

TINY = ViTConfig(**ENCODER)  # 32 px, patch 8, width 64, depth 2, 4 heads


def finetune_config(demo_dir, init_from, **extra):
  """Fine-tuning of the tiny demo encoder on the demo photographs (8 classes)."""
  config = finetune.get_config().unlock()
  config.model.update(**ENCODER)
  config.input.update(dataset="demo", data_dir=demo_dir, eval_split="val", worker_count=0)
  config.evals.classification.update(every_steps=2, batch_size=32)
  return set_fields(config.lock(), **{
      "num_classes": 8, "init_from": init_from, "batch_size": 16, "total_steps": 4,
      "warmup_steps": 1, "log_every_steps": 2, "checkpoint_every_steps": 2, **extra})


# --- The model -------------------------------------------------------------------------------

def test_drop_path_keeps_the_expected_fraction_and_is_the_identity_at_evaluation():
  x = jnp.ones((20000, 3, 2))
  y = np.asarray(drop_path(x, 0.3, jax.random.key(0)))
  kept = y[:, 0, 0] > 0
  assert abs(kept.mean() - 0.7) < 0.015  # 20000 samples: std 0.003
  np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)  # whole rows kept, rescaled
  assert (y[~kept] == 0).all()
  model = Classifier(TINY, 5, drop_path=0.5)
  params = init_classifier(model, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  plain = Classifier(TINY, 5).apply({"params": params}, images)
  np.testing.assert_array_equal(model.apply({"params": params}, images), plain)
  train = model.apply({"params": params}, images, deterministic=False,
                      rngs={"drop_path": jax.random.key(2)})
  assert not np.allclose(train, plain)


def test_classifier_starts_from_the_fixed_sincos_table():
  """At init the trained pos_embed is MAE's fixed table (zero cls row): the classifier's
  tokens before pooling are the MAE encoder's on the same weights."""
  params = init_classifier(Classifier(TINY, 5), jax.random.key(0))
  np.testing.assert_array_equal(params["encoder"]["pos_embed"],
                                sincos_2d(64, 4, cls_token=True)[None])
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  encoder = {k: v for k, v in params["encoder"].items() if k != "pos_embed"}
  encoder["norm"] = init_encoder_params(TINY, jax.random.key(3))["norm"]  # unused: no final norm
  tokens = _encode(encoder, images, TINY, final_norm=False)
  fc = params["fc_norm"]
  pooled = np.asarray(tokens)[:, 1:].mean(1)
  pooled = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(
      pooled.var(-1, keepdims=True) + 1e-6) * np.asarray(fc["scale"]) + np.asarray(fc["bias"])
  want = pooled @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  np.testing.assert_allclose(Classifier(TINY, 5).apply({"params": params}, images), want,
                             rtol=1e-5, atol=1e-9)


def test_interpolated_position_embeddings_keep_the_cls_row_and_match_torch():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  np.testing.assert_array_equal(interpolate_pos_embed(table, 14), table)  # same size
  for grid in (16, 10):  # up and down, as 224 -> 256 / 160 px with patch 16
    out = interpolate_pos_embed(table, grid)
    assert out.shape == (1, 1 + grid * grid, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], table[:, 0])
    grid_t = torch.from_numpy(table[:, 1:]).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid_t, size=(grid, grid), mode="bicubic",
                                           align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, grid * grid, 8).numpy()
    np.testing.assert_allclose(out[:, 1:], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="embeddings of 5 patches are not a square grid"):
    interpolate_pos_embed(table[:, :6], 4)


# --- Fine-tuned checkpoints against reference forwards ------------------------------------------

def _layer_norm(x, w, b, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def numpy_vit_logits(sd, images, heads, eps=1e-6):
  """The reference's models_vit.VisionTransformer(global_pool=True) forward, in numpy."""
  conv = sd["patch_embed.proj.weight"]  # [D, C, p, p]
  d, c, p, _ = conv.shape
  b, h, w, _ = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)  # (c, y, x)
  x = x.reshape(b, -1, c * p * p) @ conv.reshape(d, -1).T + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), x], 1) + sd["pos_embed"]
  n = x.shape[1]
  for i in range(len([k for k in sd if k.endswith("norm1.weight")])):
    g = lambda name: sd[f"blocks.{i}.{name}"]
    y = _layer_norm(x, g("norm1.weight"), g("norm1.bias"), eps)
    qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(b, n, 3, heads, -1)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [B, H, N, Dh] each
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + y @ g("attn.proj.weight").T + g("attn.proj.bias")
    y = _layer_norm(x, g("norm2.weight"), g("norm2.bias"), eps)
    y = y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    x = x + y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
  x = _layer_norm(x[:, 1:].mean(1), sd["fc_norm.weight"], sd["fc_norm.bias"], eps)
  return x @ sd["head.weight"].T + sd["head.bias"]


def official_finetuned_state_dict(rng, num_classes=8, depth=2, d=64, grid=4, p=8):
  """Random weights under the names main_finetune.py saves (global pool: fc_norm, no norm)."""
  f = lambda *shape: rng.normal(scale=0.2, size=shape).astype(np.float32)
  sd = {"cls_token": f(1, 1, d), "pos_embed": f(1, 1 + grid * grid, d),
        "patch_embed.proj.weight": f(d, 3, p, p), "patch_embed.proj.bias": f(d),
        "fc_norm.weight": 1 + f(d), "fc_norm.bias": f(d),
        "head.weight": f(num_classes, d), "head.bias": f(num_classes)}
  for i in range(depth):
    for name, shape in (("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                        ("norm2", (d,)), ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))):
      sd[f"blocks.{i}.{name}.weight"] = (1 + f(*shape)) if "norm" in name else f(*shape)
      sd[f"blocks.{i}.{name}.bias"] = f(shape[0])
  return sd


def test_official_finetuned_pth_gives_the_reference_logits(tmp_path, demo_dir):
  sd = official_finetuned_state_dict(np.random.default_rng(0))
  path = str(tmp_path / "mae_finetuned_tiny.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 99}, path)
  task = make_task(finetune_config(demo_dir, path))
  params, _ = task.apply_init(task.load_init(path), *task.init(jax.random.key(0)))
  images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(task.logits(params, {}, jnp.asarray(images)),
                             numpy_vit_logits(sd, images, heads=4), rtol=1e-4, atol=1e-4)
  # eval_only through the trainer: the checkpoint's accuracy, and nothing trained.
  workdir = str(tmp_path / "eval")
  state = train_and_evaluate(finetune_config(demo_dir, path, eval_only=True), workdir)
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["step"] == 0 and results["classification/count"] == 32
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_hugging_face_vit_classifier_gives_its_logits(tmp_path, demo_dir):
  from transformers import ViTConfig as HFViTConfig, ViTForImageClassification
  torch.manual_seed(0)
  model = ViTForImageClassification(HFViTConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
      image_size=32, patch_size=8, num_labels=8, layer_norm_eps=1e-12)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path / "hf")
  model.save_pretrained(path)
  config = finetune_config(demo_dir, path, pool="cls", **{"model.layer_norm_eps": 1e-12})
  task = make_task(config)
  params, _ = task.apply_init(task.load_init(path), *task.init(jax.random.key(0)))
  images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(task.logits(params, {}, jnp.asarray(images)), want, rtol=1e-4,
                             atol=1e-4)
  # The file's eps is checked against the config's.
  with pytest.raises(ValueError, match="layer_norm_eps"):
    make_task(finetune_config(demo_dir, path, pool="cls")).load_init(path)


# --- The optimizer ---------------------------------------------------------------------------

def test_layer_decay_scales_and_weight_decay_mask_parameter_by_parameter():
  params = init_classifier(Classifier(TINY, 5), jax.random.key(0))
  paths = classifier.tree_paths(params)
  scales = jax.tree_util.tree_leaves_with_path(lr_scales(paths, depth=2, decay=0.5))
  mask = dict(zip(jax.tree.leaves(paths), jax.tree.leaves(decay_mask(paths, params))))
  # depth 2: layer ids 0 (patch_embed, cls, pos), 1 and 2 (blocks), 3 (fc_norm, head);
  # scale 0.5^(3 - id).
  want_scale = {"encoder/patch_embed": 1 / 8, "encoder/cls_token": 1 / 8,
                "encoder/pos_embed": 1 / 8, "encoder/blocks_0": 1 / 4,
                "encoder/blocks_1": 1 / 2, "fc_norm": 1.0, "head": 1.0}
  for path, scale in scales:
    name = "/".join(k.key for k in path)
    prefix = [p for p in want_scale if name.startswith(p)]
    assert len(prefix) == 1 and scale == want_scale[prefix[0]], name
  decayed = sorted(k for k, v in mask.items() if v)
  assert decayed == sorted(
      ["encoder/patch_embed/kernel", "head/kernel"] +
      [f"encoder/blocks_{i}/{m}/kernel" for i in range(2)
       for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")])  # not cls, pos, 1-D


def test_adamw_with_layer_decay_matches_torch_param_groups():
  """Three steps under a changing lr equal torch.optim.AdamW on the reference's param groups
  (lr = lr_t x scale, weight decay 0.05 or 0), as main_finetune.py sets them each step."""
  rng = np.random.default_rng(0)
  params = {"a": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32),
            "c": rng.normal(size=(2, 2)).astype(np.float32)}
  scales, mask = {"a": 0.25, "b": 0.5, "c": 1.0}, {"a": True, "b": False, "c": False}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(3)]
  schedule = optim.lr_schedule(1e-2, 1, 4, end_value=1e-3)
  tx = optim.adamw_layer_decay(schedule, weight_decay=0.05, b1=0.9, b2=0.999,
                               decay_mask=mask, lr_scales=scales)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  opt = torch.optim.AdamW([{"params": [tp[k]], "lr_scale": scales[k],
                            "weight_decay": 0.05 if mask[k] else 0.0} for k in params],
                          lr=1.0, betas=(0.9, 0.999), eps=1e-8)
  for t, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = float(schedule(t)) * group["lr_scale"]
    for k in params:
      tp[k].grad = torch.from_numpy(g[k])
    opt.step()
  for k in params:
    np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-6, atol=1e-7)
  # The schedule: warmup, then cosine down to min_lr at the end.
  assert float(schedule(0)) == 0 and float(schedule(1)) == pytest.approx(1e-2)
  assert float(schedule(4)) == pytest.approx(1e-3)


def test_the_task_builds_the_recipes_schedule_and_drop_path_rates():
  """What FinetuneTask builds from configs/finetune.py (B/16 recipe, tiny model), checked
  against the recipe written out: ImageNet-1k at batch 1024 is 1251 steps an epoch, 5 warmup
  epochs to blr 5e-4 x 1024 / 256, cosine to min_lr 1e-6 at epoch 100; drop path rises
  linearly from 0 at the first block to 0.1 at the last."""
  from flax import linen as nn
  from mae_jax.models import Block
  from mae_jax.trainer import plan_and_optimizer
  config = finetune.get_config().unlock()
  config.model.update(**{**ENCODER, "depth": 3})
  config.init_from = "random"
  task = make_task(config.lock())
  plan, schedule, _ = plan_and_optimizer(task.config, task, 1_281_167)
  total, warmup, peak = 100 * 1251, 5 * 1251, 5e-4 * 1024 / 256
  assert (plan.total_steps, plan.warmup_steps, plan.peak_lr) == (total, warmup,
                                                                 pytest.approx(peak))
  for step in (warmup, (warmup + total) // 2, total - 1000, total):
    cosine = 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
    assert float(schedule(step)) == pytest.approx(1e-6 + (peak - 1e-6) * cosine, rel=1e-4)
  assert float(schedule(total)) == pytest.approx(1e-6, rel=1e-4)
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Block) and context.method_name == "__call__":
      rates[context.module.name] = context.module.drop_path
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):  # eagerly: every block is built
    task.model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert rates == {f"blocks_{i}": pytest.approx(0.1 * i / 2) for i in range(3)}


# --- Mixup / CutMix ----------------------------------------------------------------------------

MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1)


def test_mixed_labels_sum_to_one_and_equal_the_pasted_fraction():
  b, size, classes = 6, 16, 10
  images = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None],
                            (b, size, size, 3))  # image i is all (i + 1)
  labels = jnp.arange(b)
  kinds = set()
  for seed in range(12):
    rng = jax.random.key(seed)
    mixed, targets = mix_batch(rng, images, labels, classes, **MIX)
    again = mix_batch(rng, images, labels, classes, **MIX)
    np.testing.assert_array_equal(mixed, again[0])  # deterministic for the rng
    np.testing.assert_allclose(targets.sum(-1), 1, rtol=1e-6)
    mixed, targets = np.asarray(mixed), np.asarray(targets)
    own = mixed[0] == 1  # pixels of image 0 left in place; the rest come from image b - 1
    cutmix = bool(np.isin(mixed[0], (1.0, float(b))).all()) and not own.all()
    if cutmix:
      lam = own.mean()  # the kept area, after clipping the box at the border
    else:  # mixup: every pixel is lam * 1 + (1 - lam) * b
      lam = (b - mixed[0, 0, 0, 0]) / (b - 1)
      np.testing.assert_allclose(mixed[0], mixed[0, 0, 0, 0], rtol=1e-6)
    kinds.add(cutmix)
    off = 0.1 / classes
    np.testing.assert_allclose(targets[0, 0], lam * (0.9 + off) + (1 - lam) * off, rtol=1e-5)
    np.testing.assert_allclose(targets[0, b - 1], (1 - lam) * (0.9 + off) + lam * off,
                               rtol=1e-5)
  assert kinds == {True, False}  # both switched on over the seeds
  # Off: smoothed one-hot targets (plain cross-entropy at smoothing 0), images untouched.
  same, targets = mix_batch(jax.random.key(0), images, labels, classes, **{
      **MIX, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "smoothing": 0.0})
  np.testing.assert_array_equal(same, images)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, classes))


@pytest.mark.parametrize("lam,height,width", [(0.75, 32, 20), (0.19, 12, 30)])
def test_cutmix_box_is_timms_rand_bbox(lam, height, width):
  """timm's rand_bbox: sides int(side * sqrt(1 - lam)), centre uniform over the image, the
  box clipped at the border; the returned lam is the area left outside it."""
  from mae_jax.mixup import cutmix_box
  cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
  sides, edges, top_rows, left_cols = set(), set(), set(), set()
  masks, kepts = jax.jit(jax.vmap(lambda key: cutmix_box(key, jnp.float32(lam), height, width)))(
      jax.vmap(jax.random.key)(jnp.arange(300)))
  for mask, kept in zip(np.asarray(masks), np.asarray(kepts)):
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert mask.sum() == (y1 - y0) * (x1 - x0)  # one rectangle
    assert float(kept) == pytest.approx(1 - mask.mean(), abs=1e-6)
    assert y1 - y0 <= 2 * (cut_h // 2) and x1 - x0 <= 2 * (cut_w // 2)
    sides.add((y1 - y0, x1 - x0))
    top_rows |= {y1} if y0 == 0 else set()
    left_cols |= {x1} if x0 == 0 else set()
    edges |= {("top", y0 == 0), ("bottom", y1 == height), ("left", x0 == 0),
              ("right", x1 == width)}
  assert (2 * (cut_h // 2), 2 * (cut_w // 2)) in sides  # whole where not clipped ...
  assert all((edge, clipped) in edges for edge in ("top", "bottom", "left", "right")
             for clipped in (True, False))  # ... clipped at each border by some centres
  # Boxes from the top (left) edge: centres 0 .. half end at half .. 2 half, no other.
  assert top_rows == set(range(cut_h // 2, 2 * (cut_h // 2) + 1))
  assert left_cols == set(range(cut_w // 2, 2 * (cut_w // 2) + 1))


def test_cutmix_box_of_a_sliver_is_empty():
  """lam 0.99 on 40 x 8: the box is 4 rows by int(0.8) = 0 columns, empty wherever its
  centre falls (timm clips [cx - 0, cx + 0) to nothing), so nothing is pasted; on 8 x 40
  the same with 0 rows."""
  from mae_jax.mixup import cutmix_box
  for height, width in ((40, 8), (8, 40)):
    masks, kepts = jax.jit(jax.vmap(lambda key: cutmix_box(key, jnp.float32(0.99), height,
                                                           width)))(
        jax.vmap(jax.random.key)(jnp.arange(60)))
    assert not np.asarray(masks).any() and (np.asarray(kepts) == 1.0).all()


def test_mix_batch_applies_with_prob_and_switches_with_switch_prob():
  """Over 300 draws: mixing applies with probability `prob`, CutMix (the batch's pixels
  swapped, not blended) with probability `switch_prob` when both are on; with one alpha at 0
  only the other kind."""
  images = jnp.broadcast_to(jnp.arange(1.0, 5.0)[:, None, None, None], (4, 8, 12, 1))
  labels = jnp.arange(4)

  def kinds(**kw):
    first, targets = jax.jit(jax.vmap(lambda key: jax.tree.map(
        lambda x: x[0], mix_batch(key, images, labels, 4, **{**MIX, "smoothing": 0.0, **kw}))))(
            jax.vmap(jax.random.key)(jnp.arange(300)))
    first = np.asarray(first).reshape(300, -1)  # image 0 of each mixed batch, its target
    none = (first == 1).all(1)  # (or a CutMix box of 0 pixels: lam near 1)
    np.testing.assert_array_equal(np.asarray(targets)[none], np.eye(4)[[0] * none.sum()])
    cutmix = np.isin(first, (1.0, 4.0)).all(1) & ~none
    return {"none": none.mean(), "cutmix": cutmix.mean(), "mixup": 1 - (none | cutmix).mean()}
  both = kinds(prob=0.6, switch_prob=0.3)
  assert abs(both["none"] - 0.4) < 0.1 and abs(both["cutmix"] - 0.6 * 0.3) < 0.1
  assert kinds(cutmix_alpha=0.0)["mixup"] == 1.0
  with pytest.raises(TypeError):  # keyword-only: a positional alpha is never a probability
    mix_batch(jax.random.key(0), images, labels, 4, *MIX.values())
  only_cutmix = kinds(mixup_alpha=0.0, prob=1.0)
  assert only_cutmix["mixup"] == 0.0 and only_cutmix["cutmix"] > 0.85


# --- Through the trainer ---------------------------------------------------------------------

def test_finetune_resumes_bitwise_and_keeps_the_best_checkpoint(tmp_path, demo_dir,
                                                                pretrained):
  from mae_jax.checkpointing import load_params
  mae, _ = load_params(pretrained)
  # The start: the pretrained encoder's weights, the sin-cos table as pos_embed, no final
  # norm (global pool: fc_norm instead).
  task = make_task(finetune_config(demo_dir, pretrained))
  start, _ = task.apply_init(task.load_init(pretrained), *task.init(jax.random.key(0)))
  assert set(start["encoder"]) == set(mae["encoder"]) - {"norm"} | {"pos_embed"}
  for k, v in mae["encoder"].items():
    if k != "norm":
      jax.tree.map(np.testing.assert_array_equal, start["encoder"][k], v)
  np.testing.assert_array_equal(start["encoder"]["pos_embed"],
                                sincos_2d(64, 4, cls_token=True)[None])
  workdir = str(tmp_path / "ft")
  state = train_and_evaluate(finetune_config(demo_dir, pretrained), workdir)
  # Stopped at step 2 and resumed, it ends bitwise where the uninterrupted run did
  # (Mixup / CutMix and drop path come from the step's rng).
  resumed_dir = str(tmp_path / "resumed")
  train_and_evaluate(finetune_config(demo_dir, pretrained, stop_at_step=2), resumed_dir)
  resumed = train_and_evaluate(finetune_config(demo_dir, pretrained), resumed_dir)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # best/ holds the step with the best top-1 of the evaluations at steps 2 and 4 ...
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  top1 = {r["step"]: r["classification/top1"] for r in rows if "classification/top1" in r}
  assert sorted(top1) == [2, 4]
  best_step = 4 if top1[4] > top1[2] else 2
  assert os.listdir(os.path.join(workdir, "best")) == [str(best_step)]
  # ... which evaluates (eval_only, init_from=WORKDIR/best) to that top-1.
  evaluated = str(tmp_path / "eval_best")
  train_and_evaluate(finetune_config(demo_dir, os.path.join(workdir, "best"), eval_only=True),
                     evaluated)
  results = json.load(open(os.path.join(evaluated, "results.json")))
  assert results["classification/top1"] == top1[best_step]


def test_best_checkpoint_is_replaced_only_by_a_strictly_better_evaluation(tmp_path):
  """Evaluations 0.2, 0.5, 0.3, 0.5 at steps 1-4: best/ holds step 2 (the first 0.5: a tie
  does not replace it), with its state; a reopened checkpointer knows 0.5 is the bar."""
  from mae_jax.checkpointing import BestCheckpointer
  metric = "classification/top1"
  best = BestCheckpointer(str(tmp_path), metric)
  for step, value in zip((1, 2, 3, 4), (0.2, 0.5, 0.3, 0.5)):
    best.update(step, {"x": np.full(3, step, np.float32)}, {metric: value}, {"run": "a"})
  best.update(5, {"x": np.full(3, 5, np.float32)}, {"other/metric": 0.9}, {"run": "a"})
  best.close()
  assert os.listdir(tmp_path / "best") == ["2"]
  again = BestCheckpointer(str(tmp_path), metric)
  assert again.value == 0.5
  restored = again.manager.restore(2)
  np.testing.assert_array_equal(restored["state"]["x"], np.full(3, 2, np.float32))
  assert restored["config"] == {"run": "a", "best": {metric: 0.5, "step": 2}}
  again.update(6, {"x": np.full(3, 6, np.float32)}, {metric: 0.4}, {"run": "a"})
  again.close()
  assert os.listdir(tmp_path / "best") == ["2"]


@pytest.mark.parametrize("extra, error, match", [
    ({"model.width": 128}, ValueError, r"another encoder.*'width': \(64, 128\)"),
    ({"num_classes": 5}, ValueError, "num_classes is 5 but split 'train' has 8 classes"),
    ({"model.image_size": 36}, ValueError, "image_size 36 is not divisible by patch_size 8"),
    ({"init_from": None}, ValueError, "needs config.init_from"),
    ({"best_metric": "nope/top1"}, ValueError, "best_metric 'nope/top1' names no"),
])
def test_bad_finetune_input_fails_before_any_write(tmp_path, demo_dir, pretrained, extra,
                                                   error, match):
  workdir = str(tmp_path / "ft")
  with pytest.raises(error, match=match):
    train_and_evaluate(set_fields(finetune_config(demo_dir, pretrained), **extra), workdir)
  assert not os.path.exists(workdir)


def test_a_finetuned_file_of_another_class_count_or_width_is_refused(tmp_path, demo_dir):
  path = str(tmp_path / "ft.pth")
  sd = official_finetuned_state_dict(np.random.default_rng(0), num_classes=5)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  workdir = str(tmp_path / "eval")
  with pytest.raises(ValueError, match="classifies 5 classes, config.num_classes is 8"):
    train_and_evaluate(finetune_config(demo_dir, path, eval_only=True), workdir)
  wide = str(tmp_path / "wide.pth")
  sd = official_finetuned_state_dict(np.random.default_rng(0), d=32)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, wide)
  with pytest.raises(ValueError, match="another classifier than the config: width 32, "
                     "config.model.width 64"):
    train_and_evaluate(finetune_config(demo_dir, wide, eval_only=True), workdir)
  assert not os.path.exists(workdir)


# --- Per-image augmentation --------------------------------------------------------------------

def test_randaugment_and_random_erasing_are_deterministic_and_keep_shape_and_dtype():
  from mae_jax.data import randaugment
  image = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
  for name, op in randaugment.OPS.items():  # every op, at full magnitude
    out = np.asarray(op(Image.fromarray(image), 10.0, np.random.default_rng(1), (124, 116, 104)))
    assert out.shape == image.shape and out.dtype == np.uint8, name
    assert not np.array_equal(out, image), name
  augment = randaugment.RandAugment("rand-m9-mstd0.5-inc1", (0.485, 0.456, 0.406))
  outs = [augment.random_map({"image": image}, np.random.default_rng(s))["image"]
          for s in (0, 0, 1, 2, 3)]
  np.testing.assert_array_equal(outs[0], outs[1])  # same rng, same image
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) == 4  # other draws, other images
  with pytest.raises(ValueError, match="cannot read 'x9'"):
    randaugment.RandAugment("rand-x9", (0.5,) * 3)
  erase = randaugment.RandomErasing(1.0)
  flat = np.zeros((32, 32, 3), np.float32)
  a = erase.random_map({"image": flat}, np.random.default_rng(5))["image"]
  np.testing.assert_array_equal(a, erase.random_map({"image": flat},
                                                    np.random.default_rng(5))["image"])
  assert a.shape == flat.shape and a.dtype == np.float32
  rows, cols = np.nonzero((a != 0).any(-1))  # one box of noise, 2-33% of the area
  box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
  assert len(rows) == box and 0.02 * 1024 * 0.5 < box < 1024 / 3 * 1.5
  assert 0.5 < a[a != 0].std() < 1.5  # standard normal noise
  never = randaugment.RandomErasing(0.0).random_map({"image": flat}, np.random.default_rng(5))
  np.testing.assert_array_equal(never["image"], flat)


def test_randaugment_applies_each_op_with_probability_half_at_a_normal_magnitude(monkeypatch):
  """Recorders in place of the 15 ops, over 2000 seeds (4000 draws of an op): the ops are
  drawn uniformly, each applies with probability 0.5, at a level ~ N(9, 0.5) clipped to
  [0, 10] (timm's rand-m9-mstd0.5); with mstd 0 every level is exactly 9."""
  from mae_jax.data import randaugment
  calls = []
  for name in randaugment.OPS:
    monkeypatch.setitem(randaugment.OPS, name,
                        lambda im, lv, rng, fill, name=name: calls.append((name, lv)) or im)
  image = np.zeros((4, 4, 3), np.uint8)
  augment = randaugment.RandAugment("rand-m9-mstd0.5-inc1", (0.5,) * 3)
  seeds = 2000
  for seed in range(seeds):
    augment.random_map({"image": image}, np.random.default_rng(seed))
  draws = 2 * seeds  # n = 2 ops per image
  assert abs(len(calls) / draws - 0.5) < 0.04  # binomial std 0.008
  counts = np.array([sum(n == name for n, _ in calls) for name in randaugment.OPS])
  assert counts.min() > 0.5 * len(calls) / 15 and counts.max() < 1.5 * len(calls) / 15
  levels = np.array([lv for _, lv in calls])
  assert levels.min() >= 0 and levels.max() == 10
  # The clipped normal, from a million independent draws.
  reference = np.clip(np.random.default_rng(0).normal(9, 0.5, 10**6), 0, 10)
  assert abs(levels.mean() - reference.mean()) < 0.06  # std of the mean: 0.011
  assert abs(levels.std() - reference.std()) < 0.05
  assert abs((levels == 10).mean() - (reference == 10).mean()) < 0.02  # 2.3%
  calls.clear()
  fixed = randaugment.RandAugment("rand-m9-mstd0-inc1", (0.5,) * 3)
  for seed in range(200):
    fixed.random_map({"image": image}, np.random.default_rng(seed))
  assert calls and {lv for _, lv in calls} == {9.0}
  calls.clear()
  low = randaugment.RandAugment("rand-m0-mstd1-inc1", (0.5,) * 3)  # half the draws below 0
  for seed in range(100):
    low.random_map({"image": image}, np.random.default_rng(seed))
  levels = np.array([lv for _, lv in calls])
  assert levels.min() == 0.0 and 0.3 < (levels == 0).mean() < 0.7


TIMM_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                   "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                   "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                   "TranslateXRel", "TranslateYRel")  # timm's _RAND_INCREASING_TRANSFORMS


# timm's increasing ops at level lv of 10 (auto_augment.py), written out with PIL: sign -1 or
# +1 is the op's draw. Shear 0.3, translate 0.45 of the side, rotate 30 degrees, enhance 1 +- 0.9.
def timm_op(name, im, lv, sign, fill):
  affine = lambda m: im.transform(im.size, Image.Transform.AFFINE, m,
                                  resample=Image.Resampling.BICUBIC, fillcolor=fill)
  enhance = lambda kind: kind(im).enhance(1 + sign * lv / 10 * 0.9)
  from PIL import ImageEnhance, ImageOps
  return {
      "AutoContrast": lambda: ImageOps.autocontrast(im),
      "Equalize": lambda: ImageOps.equalize(im),
      "Invert": lambda: ImageOps.invert(im),
      "Rotate": lambda: im.rotate(sign * lv / 10 * 30, resample=Image.Resampling.BICUBIC,
                                  fillcolor=fill),
      "PosterizeIncreasing": lambda: ImageOps.posterize(im, 4 - int(lv / 10 * 4)),
      "SolarizeIncreasing": lambda: ImageOps.solarize(im, 256 - int(lv / 10 * 256)),
      "SolarizeAdd": lambda: Image.fromarray(np.where(
          np.asarray(im) < 128, np.minimum(255, np.asarray(im) + int(lv / 10 * 110)),
          np.asarray(im)).astype(np.uint8)),
      "ColorIncreasing": lambda: enhance(ImageEnhance.Color),
      "ContrastIncreasing": lambda: enhance(ImageEnhance.Contrast),
      "BrightnessIncreasing": lambda: enhance(ImageEnhance.Brightness),
      "SharpnessIncreasing": lambda: enhance(ImageEnhance.Sharpness),
      "ShearX": lambda: affine((1, sign * lv / 10 * 0.3, 0, 0, 1, 0)),
      "ShearY": lambda: affine((1, 0, 0, sign * lv / 10 * 0.3, 1, 0)),
      "TranslateXRel": lambda: affine((1, 0, sign * lv / 10 * 0.45 * im.size[0], 0, 1, 0)),
      "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, sign * lv / 10 * 0.45 * im.size[1])),
  }[name]()


@pytest.mark.parametrize("lv", [3.7, 7.3])
def test_randaugment_ops_are_timms_at_their_level(lv):
  from mae_jax.data import randaugment
  image = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
  fill = (124, 116, 104)
  assert set(randaugment.OPS) == set(TIMM_INCREASING)
  signs = set()
  for seed in (0, 2):  # the first draws: 0.64 (sign +1) and 0.26 (sign -1)
    sign = -1 if np.random.default_rng(seed).random() < 0.5 else 1
    signs.add(sign)
    for name, op in randaugment.OPS.items():
      got = np.asarray(op(Image.fromarray(image), lv, np.random.default_rng(seed), fill))
      want = np.asarray(timm_op(name, Image.fromarray(image), lv, sign, fill))
      np.testing.assert_array_equal(got, want, err_msg=f"{name} at {lv}, sign {sign}")
  assert signs == {-1, 1}
  # Level 10: posterize keeps no bit (black), solarize inverts every pixel.
  assert not np.asarray(randaugment.OPS["PosterizeIncreasing"](
      Image.fromarray(image), 10.0, None, fill)).any()
  np.testing.assert_array_equal(randaugment.OPS["SolarizeIncreasing"](
      Image.fromarray(image), 10.0, None, fill), 255 - image)


def test_randaugment_spec_and_fill():
  from mae_jax.data import randaugment
  assert randaugment.parse_spec("rand-m9-mstd0.5-inc1") == {"m": 9.0, "n": 2.0, "mstd": 0.5}
  assert randaugment.parse_spec("rand-n3-m7") == {"m": 7.0, "n": 3.0, "mstd": 0.0}
  assert randaugment.parse_spec("rand-inc1") == {"m": 10.0, "n": 2.0, "mstd": 0.0}  # timm's
  for spec, match in [("auto-m9", "must start with 'rand-'"), ("rand-m9-inc0", "only the "
                      "increasing ops"), ("rand-mx", "cannot read 'mx'"), ("rand-q1", "'q1'")]:
    with pytest.raises(ValueError, match=match):
      randaugment.parse_spec(spec)
  augment = randaugment.RandAugment("rand-n3-m7", (0.485, 0.456, 0.406))
  assert (augment.num_ops, augment.magnitude, augment.std) == (3, 7.0, 0.0)
  assert augment.fill == (124, 116, 104)  # the ImageNet mean in 0-255
  assert randaugment.RandAugment("rand-m9", (1.0, 1.01, 0.0)).fill == (255, 255, 0)


def test_random_erasing_boxes_follow_timms_ranges():
  """timm's RandomErasing(mode='pixel'): with probability p one box of 2-33% of the area, of
  aspect ratio 0.3-3.3 (log-uniform), filled with standard normal noise."""
  from mae_jax.data import randaugment
  image = np.zeros((40, 40, 3), np.float32)
  areas, aspects, erased = [], [], 0
  for seed in range(600):
    out = randaugment.RandomErasing().random_map({"image": image},  # p 0.25, the recipe's
                                                 np.random.default_rng(seed))["image"]
    erased += bool(out.any())
    box = randaugment.RandomErasing(1.0).random_map({"image": image},
                                                    np.random.default_rng(seed))["image"]
    rows, cols = np.nonzero(box.any(-1))
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert len(rows) == h * w  # one filled box
    areas.append(h * w / 1600)
    aspects.append(h / w)
  assert abs(erased / 600 - 0.25) < 0.06  # binomial std 0.018
  areas, aspects = np.array(areas), np.log(aspects)
  assert 0.015 < areas.min() < 0.04 and 0.28 < areas.max() < 0.37  # rounded sides
  assert abs(areas.mean() - (0.02 + 1 / 3) / 2) < 0.03
  assert -1.5 < aspects.min() < -0.9 and 0.9 < aspects.max() < 1.5  # log 0.3 = -1.2
  assert abs(aspects.mean()) < 0.1
  noise = randaugment.RandomErasing(1.0).random_map({"image": image},
                                                    np.random.default_rng(0))["image"]
  values = noise[noise != 0]
  assert abs(values.mean()) < 0.2 and abs(values.std() - 1) < 0.2


class ScriptedRng:
  """A numpy Generator stand-in that answers `random` and `uniform` from scripts (and the
  box's position and noise plainly), counting the `uniform` calls."""

  def __init__(self, random, uniforms, last=True):
    self.randoms, self.uniforms, self.uniform_calls = list(random), list(uniforms), 0
    self.last = last

  def random(self):
    return self.randoms.pop(0)

  def uniform(self, low, high):
    self.uniform_calls += 1
    return self.uniforms.pop(0)

  def integers(self, low, high):
    return high - 1 if self.last else low  # the box touches the bottom right or top left

  def normal(self, size):
    return np.ones(size)


def test_random_erasing_edges_as_timm():
  """On a 10 x 10 image: a box as wide (or as tall) as the image is refused; after timm's 10
  refused tries the image is left as it is; a box may touch the right and bottom borders
  and the top and left ones; probability 0 never erases, even on a draw of exactly 0."""
  from mae_jax.data import randaugment
  image = np.zeros((10, 10, 1), np.float32)
  erase = randaugment.RandomErasing(1.0)
  third = 1 / 3  # area 1/3 of 100 pixels at aspect 1/3 (3 x 10) or 3 (10 x 3)
  for log_aspect in (np.log(third), np.log(3)):
    rng = ScriptedRng([0.0], [third, log_aspect] * 10)
    np.testing.assert_array_equal(erase.random_map({"image": image}, rng)["image"], image)
    assert rng.uniform_calls == 20 and not rng.uniforms  # 10 tries of (area, aspect)
  rng = ScriptedRng([0.0], [0.09, 0.0])  # 9 pixels, square: 3 x 3, at the last position
  out = erase.random_map({"image": image}, rng)["image"]
  np.testing.assert_array_equal(out[7:, 7:], 1.0)
  assert out.sum() == 9
  out = erase.random_map({"image": image}, ScriptedRng([0.0], [0.09, 0.0], last=False))["image"]
  np.testing.assert_array_equal(out[:3, :3], 1.0)
  assert out.sum() == 9
  never = randaugment.RandomErasing(0.0).random_map({"image": image}, ScriptedRng([0.0], []))
  np.testing.assert_array_equal(never["image"], image)
