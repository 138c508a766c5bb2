"""Reading weights: `read(path)` recognises what a source holds, once, and returns it checked.

Sources, all ending as `Weights` (our params, their config, and what the source says about
classes and preprocessing):
  * mae_jax Orbax checkpoints: a params checkpoint (`python -m mae_jax.convert`), a workdir or
    step of pretraining (an MAE), fine-tuning (a classifier, e.g. WORKDIR/best) or a linear
    probe (a classifier: its BatchNorm folded into the head, `linear_head.fold`);
  * official facebookresearch/mae PyTorch files (`.pth`: `{'model': state_dict, ...}` or a plain
    state dict): pretrained MAEs (with decoder, or the encoder alone as the released
    `mae_pretrain_vit_*.pth`) and fine-tuned classifiers (`mae_finetuned_vit_*.pth`; timm's
    `model.safetensors` has the same names);
  * Hugging Face directories (config.json + model.safetensors or pytorch_model.bin): ViTMAE with
    the hub's key names (or those transformers 5.x writes), ViTForImageClassification.
Every name goes through `names`; pickled files through `torch_zip`'s restricted reader. Nothing
is compiled or written; params are float32 jax arrays.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from mae_jax import checkpointing, linear_head, storage
from mae_jax.classifier import Classifier, init_classifier
from mae_jax.config import VARIANTS, ModelConfig, ViTConfig
from mae_jax.mae import init_encoder_params
from mae_jax.posemb import sincos_2d
from mae_jax.weights import hf_config, names, preprocess, torch_zip

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

# Head counts are not in a state dict: the paper's variants by width, and its decoder's 16 heads.
PAPER_HEADS = {v["width"]: v["num_heads"] for v in VARIANTS.values()}
PAPER_DECODER_HEADS = 16
# models_mae.py, models_vit.py and timm build every LayerNorm with eps 1e-6; a .pth cannot say.
PTH_EPS = 1e-6
POSEMB_ATOL = 1e-4
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class Weights(NamedTuple):
  """What a source holds."""
  kind: str  # 'mae' or 'classifier'
  params: Params  # an MAE's {'encoder'[, 'decoder']}, or classifier.Classifier's
  config: ModelConfig | ViTConfig  # the MAE's, or the classifier's encoder
  num_classes: int | None = None  # a classifier's
  pool: str | None = None  # a classifier's: 'avg' (fc_norm) or 'cls'
  class_names: list[str] | None = None  # in label order, where the source names them
  view: preprocess.View | None = None  # the evaluation view the weights were trained for
  stated: tuple[str, ...] = ()  # a classifier's config fields the source states (not filled in)
  task: str | None = None  # the mae_jax task that wrote the checkpoint


# --- Files -------------------------------------------------------------------------------------

def read_state_dict(path: str) -> tuple[StateDict, dict[str, Any]]:
  """A weights file -> (state dict of numpy arrays, training args if the file holds them)."""
  if path.endswith(".safetensors"):
    with safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}, {}
  obj = torch_zip.safe_load_torch(path)
  args: dict[str, Any] = {}
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    if isinstance(obj.get("args"), argparse.Namespace):
      args = vars(obj["args"])
    obj = obj["model"]
  if not (isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values())):
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: no state dict found (expected {{'model': state_dict}} or a "
                     f"state dict of tensors; got {keys})")
  return dict(obj), args


def _is_classifier(sd: StateDict) -> bool:
  return "head.weight" in sd and not any(k.startswith(("decoder_", "mask_token")) for k in sd)


def _num_blocks(sd: StateDict, prefix: str) -> int:
  """How many distinct `prefix.N.` blocks; gaps in N show up as missing keys later."""
  return len({m[1] for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))})


def _listing(keys: set[str]) -> str:
  shown = sorted(keys)[:5]
  return ", ".join(shown) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _grid(sd: StateDict, source: str) -> int:
  conv, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]  # [D, C, p, p], [1, 1 + N, D]
  grid = math.isqrt(pos.shape[1] - 1) if pos.ndim == 3 and pos.shape[1] > 1 else 0
  if conv.ndim != 4 or conv.shape[2] != conv.shape[3] or not grid or grid**2 + 1 != pos.shape[1]:
    raise ValueError(f"{source}: only square patches on a square grid are supported "
                     f"(patch_embed {conv.shape}, pos_embed {pos.shape})")
  return grid


def _check_shapes(params: Params, abstract: Params, source: str) -> Params:
  """`params` as float32 jax arrays, after checking each shape against the model's."""
  expected = {jax.tree_util.keystr(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if x.shape != expected.get(name):
      raise ValueError(f"{source}: params{name} has shape {x.shape} in the file, the model "
                       f"needs {expected.get(name)}")
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


# --- MAEs --------------------------------------------------------------------------------------

# ModelConfig fields (and properties) that shapes or a file say, compared with a given config.
ARCH_FIELDS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads", "mlp_dim",
               "decoder_width", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim",
               "encoder_mask_tokens")


def _mae_architecture(sd: StateDict, source: str) -> tuple[dict[str, Any], bool]:
  """Checks the key set of a reference-named MAE state dict; returns (sizes from shapes keyed
  by ModelConfig field or property, encoder_only)."""
  depth, decoder_depth = _num_blocks(sd, "blocks"), _num_blocks(sd, "decoder_blocks")
  encoder_only = not any(k.startswith("decoder_") for k in sd)
  # At least one block each, so that a file without blocks reports blocks.0.* as missing.
  expected = set(names.reference_keys(names.mae_rows(
      max(depth, 1), 0 if encoder_only else max(decoder_depth, 1))))
  missing = expected - set(sd)
  unexpected = set(sd) - expected - ({"mask_token"} if encoder_only else set())
  if missing or unexpected:
    raise ValueError(
        f"{source} is not an MAE checkpoint that mae_jax can load (names as in the reference "
        f"facebookresearch/mae): missing keys: {_listing(missing) or 'none'}; "
        f"unexpected keys: {_listing(unexpected) or 'none'}")
  conv = sd["patch_embed.proj.weight"]
  arch = dict(width=conv.shape[0], channels=conv.shape[1], patch_size=conv.shape[2],
              image_size=_grid(sd, source) * conv.shape[2], depth=depth,
              mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], encoder_mask_tokens=False)
  if not encoder_only:
    arch.update(decoder_width=sd["decoder_embed.weight"].shape[0], decoder_depth=decoder_depth,
                decoder_mlp_dim=sd["decoder_blocks.0.mlp.fc1.weight"].shape[0])
  return arch, encoder_only


def _check_config(config: ModelConfig, found: dict[str, Any], source: str) -> None:
  """Raises a ValueError listing each field where `config` differs from what `source` holds."""
  diffs = [f"{name}: config {getattr(config, name)}, {source} {value}"
           for name, value in found.items() if getattr(config, name) != value]
  if diffs:
    raise ValueError(f"config does not match the checkpoint ({'; '.join(diffs)})")


def _arch_of(config: ModelConfig, encoder_only: bool) -> dict[str, Any]:
  return {f: getattr(config, f) for f in ARCH_FIELDS
          if not (encoder_only and f.startswith("decoder_"))}


def _infer_config(arch: dict[str, Any], args: dict[str, Any], source: str,
                  num_heads: int | None = None) -> ModelConfig:
  """A config for a reference state dict: sizes from shapes, `num_heads` heads (else the
  paper's variants')."""
  width = arch["width"]
  if num_heads is None and width not in PAPER_HEADS:
    raise ValueError(f"{source}: width {width} is none of the paper's variants "
                     f"({sorted(PAPER_HEADS)}), so its head count is unknown; pass a config, "
                     f"e.g. load_pretrained(path, model_config(..., num_heads=N))")
  fields = dict(image_size=arch["image_size"], patch_size=arch["patch_size"],
                channels=arch["channels"], width=width, depth=arch["depth"],
                num_heads=num_heads or PAPER_HEADS[width], mlp_ratio=arch["mlp_dim"] / width)
  if "decoder_width" in arch:
    fields.update(decoder_width=arch["decoder_width"], decoder_depth=arch["decoder_depth"],
                  decoder_num_heads=PAPER_DECODER_HEADS)
  # A training checkpoint's args say how it was trained.
  fields.update({k: args[k] for k in ("mask_ratio", "norm_pix_loss") if k in args})
  try:
    config = ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f"{source}: cannot infer a config ({e}); pass one") from None
  _check_config(config, arch, source)  # e.g. a decoder MLP ratio unlike the encoder's
  return config


def _check_posemb(sd: StateDict, config: ModelConfig, rows: list[names.Row], source: str
                  ) -> None:
  """Position embeddings in a file must be the fixed 2D sin-cos ones mae_jax computes.

  They are compared after rounding ours to the file's dtype, so half-precision files pass.
  """
  for row in rows:
    if row.kind != names.SINCOS:
      continue
    got = sd[row.reference]
    want = names.sincos_table(row, config).astype(got.dtype)
    if got.shape != want.shape:
      raise ValueError(f"{source}: {row.reference} has shape {got.shape}, the config needs "
                       f"{want.shape}")
    err = float(np.max(np.abs(got.astype(np.float32) - want.astype(np.float32))))
    if not err <= POSEMB_ATOL:
      raise ValueError(f"{source}: {row.reference} is not the fixed 2D sin-cos embedding (max "
                       f"difference {err:.3g}); learned or interpolated position embeddings "
                       f"are not supported")


def _read_mae(sd: StateDict, args: dict[str, Any], path: str, config: ModelConfig | None,
              hf: tuple[dict[str, Any], str] | None, num_heads: int | None = None) -> Weights:
  """A reference-named MAE state dict -> Weights; `hf`: (config.json's fields, its path);
  `num_heads`: the encoder's, where neither `config` nor the file says it."""
  arch, encoder_only = _mae_architecture(sd, path)
  if hf is not None:
    hf_cfg = hf_config.model_config(hf[0], arch, hf[1])  # checked against the weights
    if config is not None:
      _check_config(config, _arch_of(hf_cfg, encoder_only), "config.json")
    config = config if config is not None else hf_cfg
  elif config is not None:
    _check_config(config, arch, path)
  else:
    config = _infer_config(arch, args, path, num_heads)
  rows = names.mae_rows(config.depth, 0 if encoder_only else config.decoder_depth)
  _check_posemb(sd, config, rows, path)
  params = _check_shapes(names.from_reference(sd, rows),
                         checkpointing.abstract_params(config, encoder_only), path)
  return Weights("mae", params, config, view=preprocess.View(config.image_size))


# --- Classifiers -------------------------------------------------------------------------------

def _abstract_classifier(encoder: ViTConfig, num_classes: int, pool: str) -> Params:
  return jax.eval_shape(init_classifier, Classifier(encoder, num_classes, pool),
                        jax.random.key(0))


def _read_classifier(sd: StateDict, path: str, stated: dict[str, Any], num_heads: int | None,
                     layer_norm_eps: float | None, class_names: list[str] | None) -> Weights:
  """A models_vit-named state dict -> Weights. Sizes come from shapes; heads and eps from
  `stated` (a Hugging Face config.json), else `num_heads` (else the paper's for the width) and
  `layer_norm_eps` (else models_vit.py's 1e-6)."""
  try:
    conv = sd["patch_embed.proj.weight"]
    width = conv.shape[0]
    heads = stated.get("num_heads", num_heads or PAPER_HEADS.get(width))
    if heads is None:
      raise ValueError(f"{path}: width {width} is none of the paper's variants "
                       f"({sorted(PAPER_HEADS)}), so its head count is unknown; pass --num_heads")
    image_size, mlp_dim = _grid(sd, path) * conv.shape[2], sd["blocks.0.mlp.fc1.weight"].shape[0]
    try:
      encoder = ViTConfig(
          image_size=image_size, patch_size=conv.shape[2], channels=conv.shape[1], width=width,
          depth=_num_blocks(sd, "blocks"), num_heads=heads, mlp_ratio=mlp_dim / width,
          layer_norm_eps=stated.get("layer_norm_eps", layer_norm_eps or PTH_EPS))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: not a classifier mae_jax can represent ({e})") from None
    num_classes = sd["head.weight"].shape[0]
    pool = "avg" if "fc_norm.weight" in sd else "cls"
    params = names.from_reference(sd, names.classifier_rows(encoder.depth, pool))
  except KeyError as e:
    raise ValueError(f"{path}: a classifier checkpoint without {e}") from None
  params = _check_shapes(params, _abstract_classifier(encoder, num_classes, pool), path)
  return Weights("classifier", params, encoder, num_classes, pool,
                 class_names, preprocess.View(encoder.image_size), tuple(stated))


# --- mae_jax checkpoints -----------------------------------------------------------------------

def _read_checkpoint(path: str, meta: dict[str, Any], config: ModelConfig | None) -> Weights:
  task = meta.get("task", "pretrain")  # checkpoints from before tasks existed are MAEs
  if task == "pretrain":
    params, saved = checkpointing.load_params(path)
    if config is not None:
      _check_config(config, _arch_of(saved, "decoder" not in params), path)
    view = preprocess.run_view(saved.image_size, meta.get("config"))
    return Weights("mae", params, config if config is not None else saved, view=view, task=task)
  if task not in ("finetune", "linear_probe"):
    raise ValueError(f"{path} is a checkpoint of task {task!r}, which holds no weights to read")
  model = dict(meta["model"])
  num_classes, pool = model.pop("num_classes"), model.pop("pool")
  encoder = ViTConfig(**model)
  extra = dict(class_names=meta.get("class_names"),
               view=preprocess.run_view(encoder.image_size, meta.get("config")),
               stated=tuple(model), task=task)
  if task == "finetune":
    params = checkpointing.read_task_params(
        path, _abstract_classifier(encoder, num_classes, pool))
    return Weights("classifier", params, encoder, num_classes, pool, **extra)
  # A linear probe: the frozen encoder and the BatchNorm statistics are its model state.
  d = encoder.width
  vector = jax.ShapeDtypeStruct((d,), jnp.float32)
  state = checkpointing.read_task_params(path, {
      "encoder": jax.eval_shape(functools.partial(init_encoder_params, encoder),
                                jax.random.key(0)),
      "batch_stats": {"mean": vector, "var": vector}}, item="model_state")
  head = checkpointing.read_task_params(path, {"head": {
      "kernel": jax.ShapeDtypeStruct((d, num_classes), jnp.float32),
      "bias": jax.ShapeDtypeStruct((num_classes,), jnp.float32)}})["head"]
  return Weights("classifier", probe_classifier(state["encoder"], head, state["batch_stats"],
                                                encoder, pool),
                 encoder, num_classes, pool, **extra)


def probe_classifier(encoder_params: Params, head: Params, stats: Params, encoder: ViTConfig,
                     pool: str) -> Params:
  """A linear probe as classifier.Classifier params of the same pool and logits.

  'cls': the cls token after the final norm, as the probe's features. 'avg': the probe's
  features are the patch tokens' mean before the final norm through a LayerNorm without
  affine parameters: the classifier's fc_norm with scale 1, bias 0. The fixed sin-cos table
  becomes the (trained, in a classifier) position embeddings; the BatchNorm folds into the head.
  """
  table = sincos_2d(encoder.width, encoder.grid_size, cls_token=True)[None]  # [1, 1 + N, D]
  enc = {**encoder_params, "pos_embed": jnp.asarray(table)}
  params = {"encoder": enc, "head": linear_head.fold(head, stats)}
  if pool == "avg":
    del enc["norm"]
    params["fc_norm"] = {"scale": jnp.ones((encoder.width,)),
                         "bias": jnp.zeros((encoder.width,))}
  return params


# --- Any source --------------------------------------------------------------------------------

def read(path: str | os.PathLike[str], config: ModelConfig | None = None, *,
         num_heads: int | None = None, layer_norm_eps: float | None = None) -> Weights:
  """What `path` holds (see the module doc), every shape and name checked.

  `config` is for an MAE: it supplies what a file cannot say (a `.pth` holds no head count) and
  is checked against what the file does say (sizes, and heads where the file records them); its
  training options (mask_ratio, norm_pix_loss, layer_norm_eps, dtype) are kept. Without it, a
  `.pth` gets `num_heads` (else the paper's head count for its width). For a classifier file
  that cannot say them (a `.pth`), `num_heads` (else the paper's) and `layer_norm_eps` (else
  1e-6) fill them in;
  `Weights.stated` names what the source itself says.
  """
  path = os.fspath(path)
  storage.check(path, "weights")
  if not storage.path(path).exists():
    raise FileNotFoundError(f"{path} does not exist")
  meta = checkpointing.saved_meta(path)
  if meta is not None:
    return _read_checkpoint(path, meta, config)
  if storage.is_bucket(path):
    raise ValueError(f"{path}: from a bucket, mae_jax reads its own Orbax checkpoints and "
                     "workdirs; copy .pth and Hugging Face files to a local disk first")
  raw = None
  if os.path.isdir(path):
    json_path = os.path.join(path, "config.json")
    if not os.path.isfile(json_path):
      raise ValueError(f"{path} is neither an mae_jax Orbax checkpoint nor a Hugging Face "
                       f"directory (no config.json)")
    raw = hf_config.load_json(json_path)
    found = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    directory, path = path, os.path.join(path, found[0])
  sd, args = read_state_dict(path)
  if names.is_hub(sd):
    sd = names.from_hub(sd)
  if _is_classifier(sd):
    stated, class_names = {}, None
    if raw is not None:
      fields = hf_config.vit_fields(raw, json_path)
      stated = {k: fields[k] for k in ("num_heads", "layer_norm_eps")}
      class_names = hf_config.class_names(fields["id2label"], sd["head.weight"].shape[0])
    weights = _read_classifier(sd, path, stated, num_heads, layer_norm_eps, class_names)
  else:
    hf = None if raw is None else (hf_config.mae_fields(raw, json_path), json_path)
    weights = _read_mae(sd, args, path, config, hf, num_heads)
  if raw is not None:
    weights = weights._replace(view=preprocess.hf_view(directory, weights.view))
  return weights


def load_pretrained(path: str | os.PathLike[str], config: ModelConfig | None = None
                    ) -> tuple[Params, ModelConfig]:
  """Reads MAE weights: an official `.pth`, a Hugging Face ViTMAE directory, or Orbax.

  `config` as for `read`. Files without a decoder load as {'encoder': ...} only. Params are
  float32 jax arrays. Everything is checked before they are returned; nothing is compiled or
  written.
  """
  weights = read(path, config)
  if weights.kind != "mae":
    what = (f"a checkpoint of task {weights.task!r}" if weights.task
            else "a fine-tuned classifier")
    raise ValueError(f"{os.fspath(path)} is {what}, not an MAE (pretraining) checkpoint")
  return weights.params, weights.config
