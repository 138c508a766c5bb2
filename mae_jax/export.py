"""Exports pretrained MAE weights to Hugging Face, timm and the official (facebookresearch/mae) format.

`python -m mae_jax.export SRC DST --format {hf,timm,official} [--encoder_only]`, SRC anything
`load_pretrained` reads (a workdir, an Orbax params checkpoint, a `.pth`, a hub directory):
  * hf: DST/config.json + DST/model.safetensors with the hub's key names (`facebook/vit-mae-base`
    layout): `ViTMAEForPreTraining`, or `ViTMAEModel` with --encoder_only.
  * timm: DST/model.safetensors + DST/config.json (timm's pretrained_cfg form) of its
    VisionTransformer (`vit_base_patch16_224`, ...), the encoder only.
  * official: the file DST, `{'model': state_dict}` in `models_mae.py`'s names, with or without
    the decoder; written by torch.save when torch is installed, else as the same zip layout,
    which torch.load and mae_jax's restricted reader both read.
Every format holds the fixed sin-cos position embeddings, as the reference's state dict does.
Weights stay float32, so `load_pretrained(DST)` gives back the same bits. Everything is checked
before anything is written; DST is never overwritten. A fine-tuned classifier as SRC is
exported by `classifier_export` (ViTForImageClassification, timm's, models_vit.py's).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import sys
import zipfile
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from safetensors.numpy import save_file

from mae_jax import convert, hf_format
from mae_jax.config import FIELDS, VARIANTS, ModelConfig, ViTConfig
from mae_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.mae import Params
from mae_jax.posemb import sincos_2d

StateDict = dict[str, np.ndarray]
FORMATS = ("hf", "timm", "official")
# models_mae.py and timm's ViT build every LayerNorm with eps 1e-6; their files cannot say
# otherwise.
FIXED_EPS = 1e-6
# timm's names of the paper's variants; any other size is one of them with model_args.
TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
              "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224",
              "H/14": "vit_huge_patch14_224"}


# --- params -> the reference's state dict ------------------------------------------------------

def _linear(p: Params, name: str) -> StateDict:
  return {f"{name}.weight": p["kernel"].T, f"{name}.bias": p["bias"]}


def _layer_norm(p: Params, name: str) -> StateDict:
  return {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}


def _block(p: Params, name: str) -> StateDict:
  return {**_layer_norm(p["norm1"], f"{name}.norm1"),
          **_linear(p["attn"]["qkv"], f"{name}.attn.qkv"),
          **_linear(p["attn"]["proj"], f"{name}.attn.proj"),
          **_layer_norm(p["norm2"], f"{name}.norm2"),
          **_linear(p["mlp"]["fc1"], f"{name}.mlp.fc1"),
          **_linear(p["mlp"]["fc2"], f"{name}.mlp.fc2")}


def state_dict(params: Params, config: ModelConfig) -> StateDict:
  """params -> the reference's (models_mae.py) state dict: float32, C-contiguous numpy.

  The position embeddings are the fixed sin-cos tables the reference keeps in its state dict;
  the decoder's keys are there when `params` has a decoder.
  """
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  enc = params["encoder"]
  p, c, d = config.patch_size, config.channels, config.width
  sd = {"cls_token": enc["cls_token"],
        "pos_embed": sincos_2d(d, config.grid_size, cls_token=True)[None],  # [1, 1 + N, D]
        # [p*p*C, D] -> [p, p, C, D] -> [D, C, p, p], the conv weight.
        "patch_embed.proj.weight": enc["patch_embed"]["kernel"].reshape(p, p, c, d)
                                   .transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": enc["patch_embed"]["bias"]}
  for i in range(config.depth):
    sd.update(_block(enc[f"blocks_{i}"], f"blocks.{i}"))
  sd.update(_layer_norm(enc["norm"], "norm"))
  if "decoder" in params:
    dec = params["decoder"]
    sd.update({"mask_token": dec["mask_token"],
               "decoder_pos_embed": sincos_2d(config.decoder_width, config.grid_size,
                                              cls_token=True)[None],
               **_linear(dec["decoder_embed"], "decoder_embed")})
    for i in range(config.decoder_depth):
      sd.update(_block(dec[f"decoder_blocks_{i}"], f"decoder_blocks.{i}"))
    sd.update({**_layer_norm(dec["decoder_norm"], "decoder_norm"),
               **_linear(dec["decoder_pred"], "decoder_pred")})
  return {k: np.array(v, np.float32, order="C") for k, v in sd.items()}  # own, writable copies


# --- torch.save's zip layout, written without torch --------------------------------------------

class _Global(NamedTuple):
  """A global of torch's, by name: the pickle refers to it without importing torch."""
  module: str
  name: str


class _Storage(NamedTuple):
  key: str
  numel: int


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = _Global("torch", "FloatStorage")


class _TorchPickler(pickle._Pickler):
  """Pickles float32 arrays as torch tensors (protocol 2, storages kept apart, as torch.save)."""

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: list[np.ndarray] = []

  def persistent_id(self, obj: Any) -> Any:
    if type(obj) is _Storage:
      return ("storage", _FLOAT_STORAGE, obj.key, "cpu", obj.numel)
    return None

  def _save_array(self, obj: np.ndarray) -> None:
    """As torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""
    if obj.dtype != np.float32:
      raise TypeError(f"only float32 arrays are written, got {obj.dtype}")
    storage = _Storage(str(len(self.storages)), obj.size)
    self.storages.append(np.ascontiguousarray(obj, "<f4"))
    strides = tuple(int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim))  # in elements
    self.save(_REBUILD)
    self.save((storage, 0, obj.shape, strides, False, collections.OrderedDict()))
    self.write(pickle.REDUCE)

  def _save_global_name(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  dispatch = {**pickle._Pickler.dispatch, _Global: _save_global_name, np.ndarray: _save_array}


def write_torch_zip(obj: Any, path: str) -> None:
  """Writes `obj` (dicts of float32 arrays) in torch.save's zip layout, without torch.

  torch.load (weights_only too) and mae_jax's restricted reader both read it back.
  """
  data = io.BytesIO()
  pickler = _TorchPickler(data)
  pickler.dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", data.getvalue())
    archive.writestr("archive/byteorder", "little")
    for i, storage in enumerate(pickler.storages):
      archive.writestr(f"archive/data/{i}", storage.tobytes())
    archive.writestr("archive/version", "3\n")


def save_official(sd: StateDict, path: str) -> None:
  """`{'model': state_dict}` as a .pth: torch.save when torch imports, else the same layout."""
  try:
    import torch  # optional: only to write with torch.save itself
  except ImportError:
    write_torch_zip({"model": sd}, path)
    return
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)


# --- timm --------------------------------------------------------------------------------------

def timm_config(config: ViTConfig) -> dict[str, Any]:
  """config.json in timm's hub form: architecture, model_args where sizes differ, pretrained_cfg.

  The architecture is the paper variant of the same width, depth, heads and patch size
  (`vit_base_patch16_224`, ...), else vit_base_patch16_224 with every size in model_args.
  """
  sizes = dict(width=config.width, depth=config.depth, num_heads=config.num_heads,
               patch_size=config.patch_size)
  variant = next((name for name, v in VARIANTS.items() if v == sizes), "B/16")
  base = dict(VARIANTS[variant], image_size=224, channels=3, mlp_ratio=4.0)
  timm_args = dict(image_size="img_size", patch_size="patch_size", channels="in_chans",
                   width="embed_dim", depth="depth", num_heads="num_heads",
                   mlp_ratio="mlp_ratio")
  model_args = {arg: getattr(config, name) for name, arg in timm_args.items()
                if getattr(config, name) != base[name]}
  out = {"architecture": TIMM_NAMES[variant], "num_classes": 0, "num_features": config.width,
         "global_pool": "token"}
  if model_args:
    out["model_args"] = model_args
  out["pretrained_cfg"] = {
      "tag": "mae", "custom_load": False,
      "input_size": [config.channels, config.image_size, config.image_size],
      "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9,
      "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
      "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
      "classifier": "head"}
  return out


# --- Export ------------------------------------------------------------------------------------

def check_request(params: Params, config: ModelConfig, fmt: str, encoder_only: bool) -> None:
  """Raises a ValueError when `fmt` cannot hold the request; nothing is written before."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
  if config.encoder_mask_tokens:
    raise ValueError("this model feeds mask tokens to its encoder (the paper's "
                     "encoder_mask_tokens ablation); no exported format has that encoder")
  if "decoder" not in params and not encoder_only:
    raise ValueError("the source holds no decoder (an encoder-only checkpoint); pass "
                     "--encoder_only to export its encoder")
  if fmt == "timm" and not encoder_only:
    raise ValueError("timm's VisionTransformer holds no MAE decoder; pass --encoder_only to "
                     "export the encoder, or use --format hf or official for the whole MAE")
  if fmt in ("timm", "official") and config.layer_norm_eps != FIXED_EPS:
    raise ValueError(f"layer_norm_eps is {config.layer_norm_eps:g}, but {fmt}'s model builds "
                     f"its LayerNorms with eps {FIXED_EPS:g} and its files cannot say "
                     f"otherwise; use --format hf, whose config.json holds layer_norm_eps")


def export(params: Params, config: ModelConfig, dst: str | os.PathLike[str], fmt: str,
           encoder_only: bool = False) -> None:
  """Writes `params` to `dst` in format `fmt` ('hf', 'timm' or 'official'); see the module doc.

  Checks first: DST must not exist and the format must hold the request. Files are written
  under a temporary name and renamed at the end, so a failed export leaves no DST behind.
  """
  dst = check_dst(dst)
  check_request(params, config, fmt, encoder_only)
  if encoder_only:
    params = {"encoder": params["encoder"]}
  sd = state_dict(params, config)
  if fmt == "official":
    write(dst, sd)
  elif fmt == "hf":
    write(dst, hf_format.to_hf(sd, pretraining=not encoder_only),
          hf_format.config_json(config, pretraining=not encoder_only))
  else:
    write(dst, sd, timm_config(config))


def check_dst(dst: str | os.PathLike[str]) -> str:
  """`dst` normalised, or an error if it is a URL or exists: exports go to a local disk (a
  finished export is renamed into place) and never overwrite."""
  if "://" in os.fspath(dst):
    raise ValueError(f"{os.fspath(dst)}: export writes to a local disk (it renames a finished "
                     "export into place); copy the result to a bucket afterwards")
  dst = os.path.normpath(os.fspath(dst))
  if os.path.lexists(dst):
    raise FileExistsError(f"{dst} exists; refusing to overwrite it")
  return dst


def write(dst: str, weights: StateDict, meta: dict[str, Any] | None = None) -> None:
  """`weights` as the official .pth `dst` (no `meta`), or as the directory `dst` holding
  model.safetensors + config.json (`meta`). Written under a temporary name, then renamed."""
  tmp = f"{dst}.export-tmp"
  if os.path.lexists(tmp):
    raise FileExistsError(f"{tmp} exists (left by an interrupted export?); remove it first")
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  if meta is None:
    save_official(weights, tmp)
  else:
    os.makedirs(tmp)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")
  os.rename(tmp, dst)


def _how_to_load(dst: str, fmt: str, config: ModelConfig, encoder_only: bool) -> str:
  if fmt == "hf":
    cls = "ViTMAEModel" if encoder_only else "ViTMAEForPreTraining"
    return f"transformers.{cls}.from_pretrained({dst!r})"
  if fmt == "timm":
    meta = timm_config(config)
    args = "".join(f", {k}={v!r}" for k, v in meta.get("model_args", {}).items())
    return (f"timm.create_model({meta['architecture']!r}, pretrained=True, num_classes=0, "
            f"pretrained_cfg_overlay=dict(file={os.path.join(dst, 'model.safetensors')!r})"
            f"{args})")
  return f"torch.load({dst!r}, weights_only=True)['model']  (models_mae.py names)"


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mae_jax.export SRC DST --format F`: writes SRC's weights for other code."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.export",
      description="Export MAE weights (anything load_pretrained reads: a workdir, an Orbax "
                  "params checkpoint, an official .pth, a Hugging Face directory), or a "
                  "fine-tuned classifier (a fine-tuning workdir or its best/, an official "
                  "fine-tuned .pth, a ViTForImageClassification directory), to the "
                  "Hugging Face, timm or official format.")
  parser.add_argument("src", help="weights to read")
  parser.add_argument("dst", help="directory (hf, timm) or .pth file (official) to create; "
                                  "never overwritten")
  parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
  parser.add_argument("--encoder_only", action="store_true",
                      help="export the encoder alone (hf: ViTMAEModel); timm needs it")
  convert.add_config_flags(parser)
  args = parser.parse_args(argv)
  if os.path.lexists(args.dst):
    parser.error(f"{args.dst} exists; refusing to overwrite it")
  from mae_jax import classifier_export  # it builds on this module
  try:
    fine_tuned = classifier_export.read_classifier(args.src, args.num_heads, args.layer_norm_eps)
    if fine_tuned is None:
      params, config = convert.load_pretrained(args.src, convert.config_from_flags(args))
      export(params, config, args.dst, args.fmt, args.encoder_only)
    else:
      sizes = [f"--{k}" for k in ("variant",) + FIELDS
               if k not in ("num_heads", "layer_norm_eps") and getattr(args, k) is not None]
      if sizes:
        raise ValueError(f"{args.src} is a fine-tuned classifier, whose sizes come from its "
                         f"weights: {', '.join(sizes)} cannot apply (--num_heads and "
                         f"--layer_norm_eps can, where a .pth does not say them)")
      classifier_export.export_classifier(fine_tuned, args.dst, args.fmt, args.encoder_only)
  except (ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError) as e:
    parser.exit(1, f"error: {e}\n")
  if fine_tuned is not None:
    count = sum(x.size for x in jax.tree.leaves(fine_tuned.params))
    print(f"wrote {args.dst} ({args.fmt}, classifier: {fine_tuned.num_classes} classes, pool "
          f"{fine_tuned.pool!r}): {count:,} parameters")
    print(f"load with: {classifier_export.how_to_load(args.dst, args.fmt, fine_tuned)}")
    return 0
  kept = ("encoder",) if args.encoder_only else ("encoder", "decoder")
  count = sum(x.size for k in kept for x in jax.tree.leaves(params[k]))
  print(f"wrote {args.dst} ({args.fmt}, {' + '.join(kept)}): {count:,} parameters")
  print(f"load with: {_how_to_load(args.dst, args.fmt, config, args.encoder_only)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
