"""Writing weights for other code: Hugging Face, timm and the official format.

`write(weights, fmt, dst)` writes what `read` returns (an MAE or a classifier):
  * hf: DST/config.json + DST/model.safetensors with the hub's key names (`facebook/vit-mae-base`
    layout) and DST/preprocessor_config.json (the evaluation view as an image processor):
    `ViTMAEForPreTraining`, `ViTMAEModel` (encoder_only), or for a classifier with pool 'cls'
    `ViTForImageClassification` with its class names (id2label).
  * timm: DST/model.safetensors + DST/config.json (timm's hub form, the evaluation view in its
    pretrained_cfg, a classifier's label_names) of its VisionTransformer (`vit_base_patch16_224`
    ...): an MAE's encoder, or a classifier with `norm` (pool 'cls') or `fc_norm` ('avg').
  * official: the file DST, `{'model': state_dict}` in models_mae.py's (models_vit.py's) names;
    written by torch.save when torch is installed, else as the same zip layout (`torch_zip`).
An MAE's files hold the fixed sin-cos position embeddings, as the reference's state dict does; a
classifier's its trained ones. Weights stay float32, so reading DST gives back the same bits.
Everything is checked before anything is written; DST is never overwritten: files are written
under a temporary name, renamed at the end.
"""
from __future__ import annotations

import json
import os
from typing import Any

from safetensors.numpy import save_file

from mae_jax.config import VARIANTS
from mae_jax.weights import hf_config, names, preprocess, torch_zip
from mae_jax.weights.read import PTH_EPS, Weights

FORMATS = ("hf", "timm", "official")
# timm's names of the paper's variants; any other size is one of them with model_args.
TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
              "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224",
              "H/14": "vit_huge_patch14_224"}
TIMM_POOLS = {"avg": "avg", "cls": "token"}


def _encoder(weights: Weights):
  return weights.config if weights.kind == "classifier" else weights.config.encoder


def class_names(weights: Weights) -> list[str]:
  """A classifier's class names: the source's, else LABEL_i (a workdir from before they were
  recorded, a .pth)."""
  return weights.class_names or [f"LABEL_{i}" for i in range(weights.num_classes)]


def _view(weights: Weights) -> preprocess.View:
  return weights.view or preprocess.View(_encoder(weights).image_size)


# --- Checks ------------------------------------------------------------------------------------

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


def check_request(weights: Weights, fmt: str, encoder_only: bool) -> None:
  """Raises a ValueError when `fmt` cannot hold the request; nothing is written before."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
  eps = _encoder(weights).layer_norm_eps
  if weights.kind == "classifier":
    if encoder_only:
      raise ValueError("the source is a fine-tuned classifier; --encoder_only exports an MAE "
                       "encoder, which has fixed sin-cos position embeddings and a final norm, "
                       "not the classifier's trained ones: export the classifier whole (drop "
                       "--encoder_only)")
    if fmt == "hf" and weights.pool != "cls":
      raise ValueError("this classifier pools globally (pool='avg': mean of the patch tokens, "
                       "then fc_norm); Hugging Face's ViTForImageClassification classifies the "
                       "cls token after the final norm and would compute other logits; use "
                       "--format timm or --format official, which hold fc_norm")
  else:
    if weights.config.encoder_mask_tokens:
      raise ValueError("this model feeds mask tokens to its encoder (the paper's "
                       "encoder_mask_tokens ablation); no exported format has that encoder")
    if "decoder" not in weights.params and not encoder_only:
      raise ValueError("the source holds no decoder (an encoder-only checkpoint); pass "
                       "--encoder_only to export its encoder")
    if fmt == "timm" and not encoder_only:
      raise ValueError("timm's VisionTransformer holds no MAE decoder; pass --encoder_only to "
                       "export the encoder, or use --format hf or official for the whole MAE")
  if fmt in ("timm", "official") and eps != PTH_EPS:
    raise ValueError(f"layer_norm_eps is {eps:g}, but {fmt}'s model builds its LayerNorms "
                     f"with eps {PTH_EPS:g} and its files cannot say otherwise; use --format "
                     f"hf, whose config.json holds layer_norm_eps")


# --- What each format holds --------------------------------------------------------------------

def state_dict(weights: Weights, encoder_only: bool = False) -> names.StateDict:
  """The reference's state dict (models_mae.py, or models_vit.py for a classifier)."""
  if weights.kind == "classifier":
    rows = names.classifier_rows(weights.config.depth, weights.pool)
  else:
    decoder = 0 if encoder_only else weights.config.decoder_depth
    rows = names.mae_rows(weights.config.depth, decoder)
  return names.to_reference(weights.params, weights.config, rows)


def timm_config(weights: Weights) -> dict[str, Any]:
  """config.json in timm's hub form: architecture, model_args where sizes differ, and the
  pretrained_cfg with the evaluation view; a classifier's head, pooling and class names.

  The architecture is the paper variant of the same width, depth, heads and patch size
  (`vit_base_patch16_224`, ...), else vit_base_patch16_224 with every size in model_args.
  """
  config = _encoder(weights)
  sizes = dict(width=config.width, depth=config.depth, num_heads=config.num_heads,
               patch_size=config.patch_size)
  variant = next((name for name, v in VARIANTS.items() if v == sizes), "B/16")
  base = dict(VARIANTS[variant], image_size=224, channels=3, mlp_ratio=4.0)
  timm_args = dict(image_size="img_size", patch_size="patch_size", channels="in_chans",
                   width="embed_dim", depth="depth", num_heads="num_heads",
                   mlp_ratio="mlp_ratio")
  model_args = {arg: getattr(config, name) for name, arg in timm_args.items()
                if getattr(config, name) != base[name]}
  num_classes = weights.num_classes if weights.kind == "classifier" else 0
  pool = TIMM_POOLS[weights.pool] if weights.kind == "classifier" else "token"
  if pool != "token":  # timm's vit_*_224 pool the cls token unless told
    model_args["global_pool"] = pool
  out = {"architecture": TIMM_NAMES[variant], "num_classes": num_classes,
         "num_features": config.width, "global_pool": pool}
  if weights.kind == "classifier":
    out["label_names"] = class_names(weights)
  if model_args:
    out["model_args"] = model_args
  out["pretrained_cfg"] = {
      "tag": "mae_ft" if weights.kind == "classifier" else "mae", "custom_load": False,
      **preprocess.timm_pretrained_cfg(_view(weights), config.channels),
      "num_classes": num_classes, "pool_size": None, "first_conv": "patch_embed.proj",
      "classifier": "head"}
  return out


def files(weights: Weights, fmt: str, encoder_only: bool = False
          ) -> tuple[names.StateDict, dict[str, dict[str, Any]]]:
  """(weights, {json file name: content}) of `fmt`; no JSON for 'official' (a .pth)."""
  sd = state_dict(weights, encoder_only)
  if fmt == "official":
    return sd, {}
  if fmt == "timm":
    return sd, {"config.json": timm_config(weights)}
  if weights.kind == "classifier":
    config = hf_config.classifier_json(weights.config, class_names(weights))
    sd = names.to_hub(sd)
  else:
    config = hf_config.config_json(weights.config, pretraining=not encoder_only)
    sd = names.to_hub(sd, vit_prefix=not encoder_only)
  return sd, {"config.json": config,
              "preprocessor_config.json": preprocess.hf_processor(_view(weights))}


# --- Writing -----------------------------------------------------------------------------------

def write(weights: Weights, fmt: str, dst: str | os.PathLike[str],
          encoder_only: bool = False) -> str:
  """Writes `weights` to `dst` in format `fmt` ('hf', 'timm' or 'official'); see the module
  doc. Checks first: DST must not exist and the format must hold the request; a failed export
  leaves no DST. Returns DST, normalised."""
  dst = check_dst(dst)
  check_request(weights, fmt, encoder_only)
  sd, meta = files(weights, fmt, encoder_only)
  tmp = f"{dst}.export-tmp"
  if os.path.lexists(tmp):
    raise FileExistsError(f"{tmp} exists (left by an interrupted export?); remove it first")
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  if fmt == "official":
    torch_zip.save_official(sd, tmp)
  else:
    os.makedirs(tmp)
    for name, content in meta.items():
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    weights_file = os.path.join(tmp, "model.safetensors")
    save_file(sd, weights_file, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights the
    # mode every other file gets under the user's umask.
    os.chmod(weights_file, os.stat(os.path.join(tmp, "config.json")).st_mode & 0o777)
  os.rename(tmp, dst)
  return dst


def how_to_load(weights: Weights, fmt: str, dst: str, encoder_only: bool = False) -> str:
  """The line of Python that loads the export `dst` in its library."""
  if fmt == "hf":
    cls = ("ViTForImageClassification" if weights.kind == "classifier"
           else "ViTMAEModel" if encoder_only else "ViTMAEForPreTraining")
    return f"transformers.{cls}.from_pretrained({dst!r})"
  if fmt == "timm":  # timm reads DST/config.json: architecture, sizes, head, preprocessing
    return f"timm.create_model({'local-dir:' + dst!r}, pretrained=True)"
  names_of = "models_vit.py" if weights.kind == "classifier" else "models_mae.py"
  return f"torch.load({dst!r}, weights_only=True)['model']  ({names_of} names)"
