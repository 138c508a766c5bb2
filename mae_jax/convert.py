"""Loads pretrained MAE weights into mae_jax params, and converts them to Orbax checkpoints.

Three sources, all ending as (params, ModelConfig):
  * official facebookresearch/mae PyTorch checkpoints (`.pth`: `{'model': state_dict, ...}` or a
    plain state_dict; with decoder, or encoder only as the released `mae_pretrain_vit_*.pth`),
  * Hugging Face ViTMAE directories (`config.json` + `model.safetensors` or `pytorch_model.bin`,
    with the key names of the hub checkpoints or those `save_pretrained` of transformers 5.x
    writes),
  * mae_jax Orbax checkpoints (see `mae_jax.checkpointing`).
Hugging Face names are first mapped to the reference's names (`mae_jax.hf_format`, whose
table `mae_jax.export` applies the other way), so one converter builds the params.

Pickled files (`.pth`, `.bin`) are read by a restricted unpickler that only rebuilds tensors (as
read-only numpy arrays), dicts and argparse namespaces: no code from the file runs, no object
outside the load changes, memory stays bounded by the file's size, and torch is not needed.

Command line: `python -m mae_jax.convert SRC DST [--variant B/16] [--num_heads N ...]` writes SRC
as an Orbax params checkpoint DST.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import pickle
import re
import struct
import sys
import zipfile
from typing import IO, Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from mae_jax import checkpointing, hf_format, storage
from mae_jax.config import FIELDS, VARIANTS, ModelConfig, model_config
from mae_jax.mae import Params
from mae_jax.posemb import sincos_2d

StateDict = dict[str, np.ndarray]

# Head counts are not in a state dict: the paper's variants by width, and its decoder's 16 heads.
PAPER_HEADS = {v["width"]: v["num_heads"] for v in VARIANTS.values()}
PAPER_DECODER_HEADS = 16
POSEMB_ATOL = 1e-4

# --- Safe reading of torch.save files (zip format) -------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType(NamedTuple):
  """Stands for a torch storage class in a pickle; it only carries the element dtype."""
  dtype: np.dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 as numpy: a read-only, bounds-checked view of a storage.

  Each element must have its own place in the storage (no stride 0 on a dimension of size > 1,
  no overlap), so a tensor never holds more elements than its storage, nor more memory.
  """
  size, stride = tuple(size), tuple(stride)
  ints = (offset, *size, *stride)
  if (not isinstance(storage, np.ndarray) or len(size) != len(stride)
      or not all(isinstance(v, int) and v >= 0 for v in ints)):
    raise pickle.UnpicklingError(f"malformed tensor (offset {offset}, size {size}, "
                                 f"stride {stride})")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  reach = 0  # the largest offset the dimensions of smaller strides reach
  for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if s <= reach:
      raise pickle.UnpicklingError(
          f"tensor of size {size} with stride {stride} has elements sharing storage; expanded "
          f"or overlapping tensors are not supported")
    reach += (n - 1) * s
  if offset + reach >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} reads past its storage")
  return np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         [s * storage.itemsize for s in stride], writeable=False)


def _stored_entry(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
  """The entry `name`, which must be uncompressed, as torch.save writes every entry."""
  info = archive.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
    raise pickle.UnpicklingError(f"{name} is compressed; torch.save stores entries uncompressed, "
                                 f"and mae_jax reads no others")
  return info


class _RestrictedUnpickler(pickle._Unpickler):
  """Unpickles torch's data.pkl allowing only a few globals; storages come from the zip.

  The pure-Python unpickler, so that opcodes can be replaced. Each load gets its own globals (a
  namespace class and closures), and BUILD only sets attributes of the namespaces and
  OrderedDicts the load creates, so nothing in the file can change an object outside it.
  """

  def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix
    self._namespace = type("Namespace", (argparse.Namespace,), {})
    self._globals = {
        "collections.OrderedDict": lambda *args: collections.OrderedDict(*args),
        "argparse.Namespace": self._namespace,
        "torch._utils._rebuild_tensor_v2": lambda *args: _rebuild_tensor(*args),
        "torch._utils._rebuild_parameter": lambda data, *unused: data,
        "torch._utils._rebuild_parameter_with_state": lambda data, *unused: data,
    }
    self._big_endian = False
    if prefix + "byteorder" in archive.namelist():
      info = _stored_entry(archive, prefix + "byteorder")
      self._big_endian = archive.read(info).strip() == b"big"
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    if f"{module}.{name}" in self._globals:
      return self._globals[f"{module}.{name}"]
    raise pickle.UnpicklingError(
        f"refusing to load the global '{module}.{name}'. Only tensors, dicts and "
        f"argparse.Namespace are read from pickled checkpoints; this file may run code when "
        f"loaded with plain pickle or torch.load without weights_only")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    dtype, key, numel = pid[1].dtype, pid[2], pid[4]
    if key not in self._storages:
      try:
        info = _stored_entry(self._archive, f"{self._prefix}data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"storage {key} is missing") from None
      if info.file_size != numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"storage {key} has {info.file_size} bytes, not the "
                                     f"{numel * dtype.itemsize} of {numel} {dtype} elements")
      storage = np.frombuffer(self._archive.read(info), dtype)
      self._storages[key] = storage.byteswap() if self._big_endian else storage
    return self._storages[key]

  def _load_build(self) -> None:
    """BUILD: sets attributes of a namespace or OrderedDict of this load from a dict."""
    state, inst = self.stack.pop(), self.stack[-1]
    if type(inst) not in (self._namespace, collections.OrderedDict):
      what = next((name for name, g in self._globals.items() if g is inst),
                  f"a {type(inst).__name__}")
      raise pickle.UnpicklingError(f"refusing to set the state of {what}: only namespaces and "
                                   f"OrderedDicts the file creates get attributes")
    if type(state) is not dict:
      raise pickle.UnpicklingError(f"refusing a {type(state).__name__} as the state of a "
                                   f"{type(inst).__name__}; only a dict of attributes is read")
    for key in state:
      if type(key) is not str or hasattr(type(inst), key):
        raise pickle.UnpicklingError(f"refusing the attribute {key!r:.40} of a "
                                     f"{type(inst).__name__}: not a name, or one of its class")
    inst.__dict__.update(state)

  def _load_extension(self) -> None:
    raise pickle.UnpicklingError("refusing a pickle extension code: those look globals up in "
                                 "copyreg's process-wide registry and cache")

  def _load_bytearray8(self) -> None:
    raise pickle.UnpicklingError("refusing a protocol 5 bytearray: its declared size would be "
                                 "allocated before it is read, and torch.save writes none")

  dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build,
              pickle.BYTEARRAY8[0]: _load_bytearray8,
              **dict.fromkeys((pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0]), _load_extension)}


def safe_load_torch(path: str) -> Any:
  """Reads a `torch.save` file (zip format) without torch and without running its code.

  Tensors come back as read-only numpy arrays with their storage dtype (bfloat16 via
  ml_dtypes), views of their storages. Any global besides tensors, OrderedDict and
  argparse.Namespace is refused; namespaces come back as a subclass of argparse.Namespace.
  Memory is bounded by the file's size: entries must be uncompressed and must not overlap, and
  each tensor lies within its storage.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path} is not in torch's zip format (a legacy torch.save file or a plain pickle); "
        f"mae_jax does not unpickle those. Re-save it with torch >= 1.6: "
        f"torch.save(torch.load(path, weights_only=True), new_path)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
      raise ValueError(f"{path}: not a torch checkpoint (no single <archive>/data.pkl)")
    if sum(i.compress_size for i in archive.infolist()) > os.path.getsize(path):
      raise ValueError(f"{path}: not a torch checkpoint (its zip entries overlap)")
    try:
      with archive.open(_stored_entry(archive, pickles[0])) as f:
        return _RestrictedUnpickler(f, archive, pickles[0][:-len("data.pkl")]).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError,
            ValueError, struct.error) as e:
      raise pickle.UnpicklingError(f"{path}: {e}") from None


# --- Reading state dicts -----------------------------------------------------------------------

def _read_state_dict(path: str) -> tuple[StateDict, dict[str, Any]]:
  """A weights file -> (state dict of numpy arrays, training args if the file holds them)."""
  if path.endswith(".safetensors"):
    with safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}, {}
  obj = safe_load_torch(path)
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


# --- Architecture of a state dict (reference names) --------------------------------------------

_BLOCK_KEYS = tuple(f"{m}.{w}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                          "mlp.fc2") for w in ("weight", "bias"))
_ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "norm.weight", "norm.bias")
_DECODER_KEYS = ("mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                 "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
                 "decoder_pred.bias")


def _num_blocks(sd: StateDict, prefix: str) -> int:
  """How many distinct `prefix.N.` blocks; gaps in N show up as missing keys later."""
  return len({m[1] for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))})


def _listing(names: set[str]) -> str:
  shown = sorted(names)[:5]
  return ", ".join(shown) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _architecture(sd: StateDict, source: str) -> tuple[dict[str, Any], bool]:
  """Checks the key set of a reference-named state dict; returns (sizes from shapes, encoder_only).

  Sizes are keyed by ModelConfig field or property names, to be compared with a config.
  """
  depth = _num_blocks(sd, "blocks")
  decoder_depth = _num_blocks(sd, "decoder_blocks")
  encoder_only = not any(k.startswith("decoder_") for k in sd)
  # At least one block each, so that a file without blocks reports blocks.0.* as missing.
  expected = set(_ENCODER_KEYS) | {f"blocks.{i}.{k}" for i in range(max(depth, 1))
                                   for k in _BLOCK_KEYS}
  if not encoder_only:
    expected |= set(_DECODER_KEYS) | {f"decoder_blocks.{i}.{k}"
                                      for i in range(max(decoder_depth, 1)) for k in _BLOCK_KEYS}
  missing = expected - set(sd)
  unexpected = set(sd) - expected - ({"mask_token"} if encoder_only else set())
  if missing or unexpected:
    raise ValueError(
        f"{source} is not an MAE checkpoint that mae_jax can load (names as in the reference "
        f"facebookresearch/mae): missing keys: {_listing(missing) or 'none'}; "
        f"unexpected keys: {_listing(unexpected) or 'none'}")
  conv, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]  # [D, C, p, p], [1, 1 + N, D]
  grid = math.isqrt(pos.shape[1] - 1) if pos.ndim == 3 and pos.shape[1] > 1 else 0
  if conv.ndim != 4 or conv.shape[2] != conv.shape[3] or not grid or grid**2 + 1 != pos.shape[1]:
    raise ValueError(f"{source}: only square patches on a square grid are supported "
                     f"(patch_embed {conv.shape}, pos_embed {pos.shape})")
  arch = dict(width=conv.shape[0], channels=conv.shape[1], patch_size=conv.shape[2],
              image_size=grid * conv.shape[2], depth=depth,
              mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], encoder_mask_tokens=False)
  if not encoder_only:
    arch.update(decoder_width=sd["decoder_embed.weight"].shape[0], decoder_depth=decoder_depth,
                decoder_mlp_dim=sd["decoder_blocks.0.mlp.fc1.weight"].shape[0])
  return arch, encoder_only


# --- Configs -----------------------------------------------------------------------------------

ARCH_FIELDS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads", "mlp_dim",
               "decoder_width", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim",
               "encoder_mask_tokens")


def _check_config(config: ModelConfig, found: dict[str, Any], source: str) -> None:
  """Raises a ValueError listing each field where `config` differs from what `source` holds."""
  diffs = [f"{name}: config {getattr(config, name)}, {source} {value}"
           for name, value in found.items() if getattr(config, name) != value]
  if diffs:
    raise ValueError(f"config does not match the checkpoint ({'; '.join(diffs)})")


def _arch_of(config: ModelConfig, encoder_only: bool) -> dict[str, Any]:
  return {f: getattr(config, f) for f in ARCH_FIELDS
          if not (encoder_only and f.startswith("decoder_"))}


def _infer_config(arch: dict[str, Any], args: dict[str, Any], source: str) -> ModelConfig:
  """A config for a reference state dict: sizes from shapes, heads of the paper's variants."""
  width = arch["width"]
  if width not in PAPER_HEADS:
    raise ValueError(f"{source}: width {width} is none of the paper's variants "
                     f"({sorted(PAPER_HEADS)}), so its head count is unknown; pass a config, "
                     f"e.g. load_pretrained(path, model_config(..., num_heads=N))")
  fields = dict(image_size=arch["image_size"], patch_size=arch["patch_size"],
                channels=arch["channels"], width=width, depth=arch["depth"],
                num_heads=PAPER_HEADS[width], mlp_ratio=arch["mlp_dim"] / width)
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


# --- Reference state dict -> params ------------------------------------------------------------

def _check_posemb(sd: StateDict, config: ModelConfig, source: str) -> None:
  """Position embeddings in a file must be the fixed 2D sin-cos ones mae_jax computes.

  They are compared after rounding ours to the file's dtype, so half-precision files pass.
  """
  for key, dim in (("pos_embed", config.width), ("decoder_pos_embed", config.decoder_width)):
    if key not in sd:
      continue
    got = sd[key]
    want = sincos_2d(dim, config.grid_size, cls_token=True)[None].astype(got.dtype)
    if got.shape != want.shape:
      raise ValueError(f"{source}: {key} has shape {got.shape}, the config needs {want.shape}")
    err = float(np.max(np.abs(got.astype(np.float32) - want.astype(np.float32))))
    if not err <= POSEMB_ATOL:
      raise ValueError(f"{source}: {key} is not the fixed 2D sin-cos embedding (max difference "
                       f"{err:.3g}); learned or interpolated position embeddings are not "
                       f"supported")


def _dense(sd: StateDict, name: str) -> Params:
  return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _norm(sd: StateDict, name: str) -> Params:
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _block(sd: StateDict, name: str) -> Params:
  return {"norm1": _norm(sd, f"{name}.norm1"), "norm2": _norm(sd, f"{name}.norm2"),
          "attn": {"qkv": _dense(sd, f"{name}.attn.qkv"), "proj": _dense(sd, f"{name}.attn.proj")},
          "mlp": {"fc1": _dense(sd, f"{name}.mlp.fc1"), "fc2": _dense(sd, f"{name}.mlp.fc2")}}


def _to_params(sd: StateDict, config: ModelConfig, encoder_only: bool, source: str) -> Params:
  """Reference state dict -> float32 params, each shape checked against the model's."""
  conv = sd["patch_embed.proj.weight"]  # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]
  params = {"encoder": {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                      "bias": sd["patch_embed.proj.bias"]},
      "cls_token": sd["cls_token"],
      **{f"blocks_{i}": _block(sd, f"blocks.{i}") for i in range(config.depth)},
      "norm": _norm(sd, "norm")}}
  if not encoder_only:
    params["decoder"] = {
        "decoder_embed": _dense(sd, "decoder_embed"), "mask_token": sd["mask_token"],
        **{f"decoder_blocks_{i}": _block(sd, f"decoder_blocks.{i}")
           for i in range(config.decoder_depth)},
        "decoder_norm": _norm(sd, "decoder_norm"), "decoder_pred": _dense(sd, "decoder_pred")}
  expected = {jax.tree_util.keystr(path): x.shape for path, x in
              jax.tree_util.tree_leaves_with_path(checkpointing.abstract_params(config,
                                                                                encoder_only))}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if x.shape != expected.get(name):
      raise ValueError(f"{source}: params{name} has shape {x.shape} in the file, the model "
                       f"needs {expected.get(name)}")
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


# --- Public entry points -----------------------------------------------------------------------

def load_pretrained(path: str, config: ModelConfig | None = None) -> tuple[Params, ModelConfig]:
  """Reads MAE weights: an official `.pth`, a Hugging Face ViTMAE directory, or Orbax.

  `config` supplies what a file cannot say (a `.pth` holds no head count) and is checked against
  what the file does say (sizes from shapes, and heads where the file records them); its training
  options (mask_ratio, norm_pix_loss, layer_norm_eps, dtype) are kept. Without it, a `.pth` gets
  the paper's head counts for its width. Files without a decoder load as {'encoder': ...} only.
  Params are float32 jax arrays. Everything is checked before they are returned; nothing is
  compiled or written.
  """
  path = os.fspath(path)
  storage.check(path, "weights")
  if not storage.path(path).exists():
    raise FileNotFoundError(f"{path} does not exist")
  if checkpointing.is_orbax_dir(path):
    params, saved = checkpointing.load_params(path)
    if config is not None:
      _check_config(config, _arch_of(saved, "decoder" not in params), path)
    return params, config if config is not None else saved
  if storage.is_bucket(path):
    raise ValueError(f"{path}: from a bucket, mae_jax reads its own Orbax checkpoints and "
                     "workdirs; copy .pth and Hugging Face files to a local disk first")

  hf_fields = None
  if os.path.isdir(path):
    json_path = os.path.join(path, "config.json")
    if not os.path.isfile(json_path):
      raise ValueError(f"{path} is neither an mae_jax Orbax checkpoint nor a Hugging Face "
                       f"directory (no config.json)")
    hf_fields = hf_format.read_config(json_path)
    names = [n for n in ("model.safetensors", "pytorch_model.bin")
             if os.path.isfile(os.path.join(path, n))]
    if not names:
      raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    path = os.path.join(path, names[0])
  sd, args = _read_state_dict(path)
  if hf_format.is_hf(sd):
    sd = hf_format.from_hf(sd)
  arch, encoder_only = _architecture(sd, path)
  if hf_fields is not None:
    hf_config = hf_format.model_config(hf_fields, arch, json_path)  # checked against the weights
    if config is not None:
      _check_config(config, _arch_of(hf_config, encoder_only), "config.json")
    config = config if config is not None else hf_config
  elif config is not None:
    _check_config(config, arch, path)
  else:
    config = _infer_config(arch, args, path)
  _check_posemb(sd, config, path)
  return _to_params(sd, config, encoder_only, path), config


def _parse_bool(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  return text.lower() in ("true", "1")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """--variant and one flag per ModelConfig field, for sources whose config is incomplete."""
  parser.add_argument("--variant", choices=list(VARIANTS),
                      help="base config the overrides below apply to (default B/16 when any "
                           "override is given); without both, the file's architecture is used")
  for field in dataclasses.fields(ModelConfig):
    kind = type(field.default)
    parser.add_argument(f"--{field.name}", type=_parse_bool if kind is bool else kind,
                        help=f"model config override ({kind.__name__})")


def config_from_flags(args: argparse.Namespace) -> ModelConfig | None:
  """The config the flags of `add_config_flags` ask for, or None when none is given."""
  overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
  return model_config(args.variant or "B/16", **overrides) if args.variant or overrides else None


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mae_jax.convert SRC DST`: writes SRC's weights as an Orbax params checkpoint."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.convert",
      description="Convert an official MAE .pth, a Hugging Face ViTMAE directory or an mae_jax "
                  "checkpoint into an mae_jax Orbax params checkpoint.")
  parser.add_argument("src", help="weights to read")
  parser.add_argument("dst", help="Orbax checkpoint directory to create (never overwritten)")
  add_config_flags(parser)
  args = parser.parse_args(argv)
  try:
    storage.check(args.dst, "DST")
    if storage.path(args.dst).exists():
      parser.exit(2, f"error: {args.dst} exists; refusing to overwrite it\n")  # as argparse
    src = args.src
    storage.check(src, "SRC")
    if (checkpointing.is_orbax_dir(src)
        and not (storage.path(src) / "config").is_dir()):  # a workdir: its newest step
      src = checkpointing.latest_step_dir(src)
      print(f"reading step {src.name} of {args.src}")
    params, config = load_pretrained(src, config_from_flags(args))
  except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
    parser.exit(1, f"error: {e}\n")
  checkpointing.save_params(args.dst, params, config)
  counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}
  print(f"wrote {args.dst}: {sum(counts.values()):,} parameters ("
        + ", ".join(f"{k} {n:,}" for k, n in counts.items()) + ")")
  print(f"config: {config.to_dict()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
