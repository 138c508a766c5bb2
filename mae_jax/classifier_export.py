"""Exports fine-tuned ViT classifiers to Hugging Face, timm and the official format.

`python -m mae_jax.export SRC DST --format F` lands here when SRC is a classifier: a fine-tuning
workdir or its `best/`, an official fine-tuned `.pth`, a Hugging Face ViTForImageClassification.
  * official: `{'model': state_dict}` in models_vit.py's names: the trained `pos_embed`, then
    `fc_norm` + `head` (global pool) or `norm` + `head` (cls token).
  * timm: the same keys (timm's VisionTransformer names them alike: `fc_norm` when
    global_pool='avg', `norm` when 'token'), with config.json in the pretrained_cfg form.
  * hf: ViTForImageClassification, which classifies the cls token after the final layernorm:
    only pool='cls' classifiers are that model. A global-pool one is refused (transformers has
    no ViT that averages patch tokens into an fc_norm).
The position embeddings are the trained ones, written as they are. Reading back (the finetune
task's `load_init`, `classifier_format`) gives the same bits.
"""
from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from mae_jax import checkpointing, classifier_format, export, hf_format
from mae_jax.classifier import Classifier, Params, init_classifier
from mae_jax.config import ViTConfig
from mae_jax.convert import PAPER_HEADS

StateDict = dict[str, np.ndarray]
# What models_vit.py builds its LayerNorms with (a .pth cannot say) and what a Hugging Face
# config.json that leaves layer_norm_eps out means (transformers' ViTConfig default).
PTH_EPS, HF_DEFAULT_EPS = 1e-6, 1e-12
HF_DEFAULT_HEADS = 12
TIMM_POOLS = {"avg": "avg", "cls": "token"}


class FineTuned(NamedTuple):
  """A fine-tuned classifier as read from SRC."""
  params: Params  # classifier.Classifier's
  encoder: ViTConfig
  num_classes: int
  pool: str  # 'avg' or 'cls'
  labels: list[str] | None  # class names in order, where the source names them


# --- Reading -----------------------------------------------------------------------------------

def _abstract(encoder: ViTConfig, num_classes: int, pool: str) -> Params:
  return jax.eval_shape(init_classifier, Classifier(encoder, num_classes, pool),
                        jax.random.key(0))


def _agree(name: str, value: Any, given: Any, path: str) -> Any:
  if given is not None and given != value:
    raise ValueError(f"{path} is a classifier with {name} {value}, --{name} says {given}")
  return value


def _infer_encoder(sd: StateDict, hf: dict[str, Any], path: str, num_heads: int | None,
                   layer_norm_eps: float | None) -> ViTConfig:
  """The encoder of a models_vit-named state dict: sizes from shapes; heads and eps from a
  Hugging Face config.json, else from the flags (a .pth holds neither) or the paper's."""
  conv, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]  # [D, C, p, p], [1, 1 + N, D]
  grid = math.isqrt(pos.shape[1] - 1) if pos.ndim == 3 and pos.shape[1] > 1 else 0
  if conv.ndim != 4 or conv.shape[2] != conv.shape[3] or not grid or grid**2 + 1 != pos.shape[1]:
    raise ValueError(f"{path}: only square patches on a square grid are supported "
                     f"(patch_embed {conv.shape}, pos_embed {pos.shape})")
  width = conv.shape[0]
  if hf:
    heads = _agree("num_heads", hf.get("num_attention_heads", HF_DEFAULT_HEADS), num_heads, path)
    eps = _agree("layer_norm_eps", hf.get("layer_norm_eps", HF_DEFAULT_EPS), layer_norm_eps,
                 path)
  else:
    heads = num_heads or PAPER_HEADS.get(width)
    if heads is None:
      raise ValueError(f"{path}: width {width} is none of the paper's variants "
                       f"({sorted(PAPER_HEADS)}), so its head count is unknown; pass --num_heads")
    eps = layer_norm_eps or PTH_EPS
  try:
    return ViTConfig(
        image_size=grid * conv.shape[2], patch_size=conv.shape[2], channels=conv.shape[1],
        width=width, depth=len([k for k in sd if k.endswith(".norm1.weight")]),
        num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
        layer_norm_eps=eps)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a classifier mae_jax can represent ({e})") from None


def _hf_labels(hf: dict[str, Any], num_classes: int) -> list[str] | None:
  id2label = hf.get("id2label")
  if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(num_classes)}:
    return None
  return [str(id2label[str(i)]) for i in range(num_classes)]


def read_classifier(path: str, num_heads: int | None = None,
                    layer_norm_eps: float | None = None) -> FineTuned | None:
  """SRC -> the classifier it holds, or None where it holds no classifier head (a pretrained
  MAE, a linear probe).

  A fine-tuning checkpoint says its whole config; a Hugging Face directory its heads and eps;
  a .pth neither: `num_heads` (else the paper's for the width) and `layer_norm_eps` (else
  models_vit.py's 1e-6) fill them in, and must agree with a source that says them.
  """
  path = os.fspath(path)
  meta = checkpointing.saved_meta(path)
  if meta is not None:
    if meta.get("task") != "finetune":
      return None
    model = dict(meta["model"])
    num_classes, pool = model.pop("num_classes"), model.pop("pool")
    encoder = ViTConfig(**model)
    _agree("num_heads", encoder.num_heads, num_heads, path)
    _agree("layer_norm_eps", encoder.layer_norm_eps, layer_norm_eps, path)
    params = checkpointing.read_task_params(path, _abstract(encoder, num_classes, pool))
    return FineTuned(params, encoder, num_classes, pool, None)
  sd, hf = classifier_format.read_state_dict(path)
  if "head.weight" not in sd:
    return None
  try:
    encoder = _infer_encoder(sd, hf, path, num_heads, layer_norm_eps)
  except KeyError as e:
    raise ValueError(f"{path}: a classifier checkpoint without {e}") from None
  num_classes = sd["head.weight"].shape[0]
  pool = "avg" if "fc_norm.weight" in sd else "cls"
  params = classifier_format.load_classifier(path, _abstract(encoder, num_classes, pool),
                                             pool, num_classes)[0]
  return FineTuned(params, encoder, num_classes, pool, _hf_labels(hf, num_classes))


# --- Writing -----------------------------------------------------------------------------------

def state_dict(params: Params, config: ViTConfig, pool: str) -> StateDict:
  """Classifier params -> models_vit.py's state dict (timm's too): float32, C-contiguous."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  enc = params["encoder"]
  p, c, d = config.patch_size, config.channels, config.width
  sd = {"cls_token": enc["cls_token"], "pos_embed": enc["pos_embed"],  # trained: as they are
        # [p*p*C, D] -> [p, p, C, D] -> [D, C, p, p], the conv weight.
        "patch_embed.proj.weight": enc["patch_embed"]["kernel"].reshape(p, p, c, d)
                                   .transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": enc["patch_embed"]["bias"]}
  for i in range(config.depth):
    sd.update(export._block(enc[f"blocks_{i}"], f"blocks.{i}"))  # pylint: disable=protected-access
  if pool == "avg":
    sd.update(export._layer_norm(params["fc_norm"], "fc_norm"))  # pylint: disable=protected-access
  else:
    sd.update(export._layer_norm(enc["norm"], "norm"))  # pylint: disable=protected-access
  sd.update(export._linear(params["head"], "head"))  # pylint: disable=protected-access
  return {k: np.array(v, np.float32, order="C") for k, v in sd.items()}


def _labels(model: FineTuned) -> list[str]:
  return model.labels or [f"LABEL_{i}" for i in range(model.num_classes)]


def hf_config(model: FineTuned) -> dict[str, Any]:
  """config.json of a ViTForImageClassification, with the class names."""
  cfg = model.encoder
  labels = _labels(model)
  return {"architectures": ["ViTForImageClassification"], "model_type": "vit",
          "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
          "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim,
          "hidden_act": "gelu", "layer_norm_eps": cfg.layer_norm_eps,
          "image_size": cfg.image_size, "patch_size": cfg.patch_size,
          "num_channels": cfg.channels, "qkv_bias": True, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "dtype": "float32",
          "id2label": {str(i): name for i, name in enumerate(labels)},
          "label2id": {name: i for i, name in enumerate(labels)}}


def to_hf(sd: StateDict) -> StateDict:
  """models_vit names (pool='cls') -> ViTForImageClassification's: `vit.*`, `classifier`."""
  head = {"classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
  body = {k: v for k, v in sd.items() if not k.startswith("head.")}
  return {**hf_format.to_hf(body, pretraining=True), **head}  # `vit.` before each encoder key


def timm_config(model: FineTuned) -> dict[str, Any]:
  """timm's config.json for the classifier: its head, pooling and class names."""
  out = export.timm_config(model.encoder)
  pool = TIMM_POOLS[model.pool]
  out.update(num_classes=model.num_classes, global_pool=pool, label_names=_labels(model))
  if pool != "token":  # timm's vit_*_224 pool the cls token unless told
    out["model_args"] = {**out.get("model_args", {}), "global_pool": pool}
  # main_finetune.py evaluates on a center crop of 224/256.
  out["pretrained_cfg"].update(tag="mae_ft", num_classes=model.num_classes, crop_pct=0.875)
  return out


def check_request(model: FineTuned, fmt: str, encoder_only: bool) -> None:
  """Raises a ValueError when `fmt` cannot hold the classifier; nothing is written before."""
  if fmt not in export.FORMATS:
    raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(export.FORMATS)}")
  if encoder_only:
    raise ValueError("the source is a fine-tuned classifier; --encoder_only exports an MAE "
                     "encoder, which has fixed sin-cos position embeddings and a final norm, "
                     "not the classifier's trained ones: export the classifier whole (drop "
                     "--encoder_only)")
  if fmt == "hf" and model.pool != "cls":
    raise ValueError("this classifier pools globally (pool='avg': mean of the patch tokens, "
                     "then fc_norm); Hugging Face's ViTForImageClassification classifies the "
                     "cls token after the final norm and would compute other logits; use "
                     "--format timm or --format official, which hold fc_norm")
  if fmt in ("timm", "official") and model.encoder.layer_norm_eps != export.FIXED_EPS:
    raise ValueError(f"layer_norm_eps is {model.encoder.layer_norm_eps:g}, but {fmt}'s model "
                     f"builds its LayerNorms with eps {export.FIXED_EPS:g} and its files "
                     f"cannot say otherwise; use --format hf, whose config.json holds "
                     f"layer_norm_eps")


def export_classifier(model: FineTuned, dst: str | os.PathLike[str], fmt: str,
                      encoder_only: bool = False) -> None:
  """Writes the classifier to `dst` in format `fmt`; checks first, as `export.export`: DST must
  not exist, the format must hold the classifier, and a failed export leaves no DST."""
  dst = export.check_dst(dst)
  check_request(model, fmt, encoder_only)
  sd = state_dict(model.params, model.encoder, model.pool)
  if fmt == "official":
    export.write(dst, sd)
  elif fmt == "hf":
    export.write(dst, to_hf(sd), hf_config(model))
  else:
    export.write(dst, sd, timm_config(model))


def how_to_load(dst: str, fmt: str, model: FineTuned) -> str:
  if fmt == "hf":
    return f"transformers.ViTForImageClassification.from_pretrained({dst!r})"
  if fmt == "timm":
    meta = timm_config(model)
    args = "".join(f", {k}={v!r}" for k, v in meta.get("model_args", {}).items())
    # timm drops a head whose class count differs from the pretrained_cfg's: say it there too.
    return (f"timm.create_model({meta['architecture']!r}, pretrained=True, "
            f"num_classes={model.num_classes}, pretrained_cfg_overlay=dict(file="
            f"{os.path.join(dst, 'model.safetensors')!r}, num_classes={model.num_classes})"
            f"{args})")
  return f"torch.load({dst!r}, weights_only=True)['model']  (models_vit.py names)"
