"""Loading official MAE, Hugging Face ViTMAE and Orbax weights: parity, checks and safety.

Reference outputs come from transformers' ViTMAE (PyTorch) with random weights, for the same
images and masking noise.
"""
import argparse
import collections
import copy
import copyreg
import dataclasses
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import convert_fixtures as fx
from mae_jax import convert, encode, load_pretrained, mae_apply, model_config
from mae_jax.models import Block
from mae_jax.weights import torch_zip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_rng = np.random.RandomState(0)
IMAGES = _rng.randn(2, 32, 32, 3).astype(np.float32)  # NHWC; the torch side gets NCHW
NOISE = _rng.rand(2, 16).astype(np.float32)


def tiny_config(**overrides):
  return model_config("B/16", **{**dict(image_size=32, patch_size=8, width=64, depth=2,
                                        num_heads=4, decoder_width=32, decoder_depth=2,
                                        decoder_num_heads=4, layer_norm_eps=1e-12,
                                        norm_pix_loss=False), **overrides})


def rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


# A few times the float32 error observed against transformers (max |diff| / max |want|):
# predictions 3e-7 to 8e-7, losses under 1e-7, encoder outputs 6e-7. A block's LayerNorm
# eps at 1e-6 instead of the config's 1e-12 gives 2e-6 to 2e-5, tanh GELU over 1e-4.
PRED_TOL, LOSS_TOL, ENCODER_TOL = 2e-6, 5e-7, 3e-6


def assert_matches_torch(params, config, want):
  loss, logits, mask = want
  out = mae_apply(params, IMAGES, config=config, noise=NOISE)
  np.testing.assert_array_equal(np.asarray(out.mask), mask)
  pred_err, loss_err = rel_err(out.pred, logits), abs(float(out.loss) - loss) / abs(loss)
  print(f"pred rel err {pred_err:.2e}, loss rel err {loss_err:.2e}")
  assert pred_err < PRED_TOL and loss_err < LOSS_TOL, (pred_err, loss_err)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module", params=[False, True], ids=["pixels", "norm_pix"])
def hf(request):
  """(torch model, its (loss, logits, mask)) for norm_pix_loss False and True."""
  model = fx.random_model(fx.hf_config(norm_pix_loss=request.param), seed=int(request.param))
  return model, fx.pretraining_outputs(model, IMAGES, NOISE)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
  """A hub-style directory (config.json + hub-named model.safetensors) and its torch model."""
  model = fx.random_model(fx.hf_config(), seed=0)
  return fx.write_hub_dir(str(tmp_path_factory.mktemp("hub") / "vit-mae"), model), model


@pytest.mark.parametrize("layout", ["hub_safetensors", "hub_bin", "save_pretrained"])
def test_hugging_face_dir_matches_torch(hf, layout, tmp_path):
  model, want = hf
  path = str(tmp_path / "hf")
  if layout == "save_pretrained":  # transformers 5.x writes decoder.decoder_encoder.layer.N...
    model.save_pretrained(path)
  else:
    fx.write_hub_dir(path, model, "pytorch_model.bin" if layout == "hub_bin" else
                     "model.safetensors")
  params, config = load_pretrained(path)
  assert config == tiny_config(norm_pix_loss=model.config.norm_pix_loss)
  assert_matches_torch(params, config, want)


def test_hub_names_are_what_transformers_reads(hub_dir):
  """The test's hub layout is one transformers loads back as the same model."""
  path, model = hub_dir
  reloaded, info = type(model).from_pretrained(path, output_loading_info=True)
  assert not any(info.values()), info
  want = fx.pretraining_outputs(model, IMAGES, NOISE)
  got = fx.pretraining_outputs(reloaded.eval(), IMAGES, NOISE)
  np.testing.assert_array_equal(got[1], want[1])


def test_official_pth_matches_torch(hf, tmp_path):
  model, want = hf
  sd = fx.reference_state_dict(model)
  weight = torch.nn.Parameter(torch.ones(3))
  optimizer = torch.optim.AdamW([weight])
  weight.sum().backward()
  optimizer.step()
  path = tmp_path / "checkpoint-3.pth"
  torch.save({"model": sd, "optimizer": optimizer.state_dict(), "epoch": 3,
              "scaler": {"scale": 65536.0, "_growth_tracker": 7},
              "args": argparse.Namespace(lr=1e-3, model="mae_vit_tiny")}, path)
  config = tiny_config(norm_pix_loss=model.config.norm_pix_loss)
  params, got_config = load_pretrained(path, config)
  assert got_config == config
  assert_matches_torch(params, config, want)

  torch.save(sd, tmp_path / "plain.pth")  # a bare state dict loads the same
  assert_trees_equal(load_pretrained(tmp_path / "plain.pth", config)[0], params)


def test_encoder_only_files_match_torch(hub_dir, tmp_path):
  _, model = hub_dir
  encoder = fx.encoder_model(model)
  want = fx.encoder_outputs(encoder, IMAGES)
  sd = fx.reference_state_dict(model)
  encoder_sd = {k: v for k, v in sd.items() if not k.startswith("decoder")}
  torch.save({"model": encoder_sd}, tmp_path / "mae_pretrain_vit_tiny.pth")
  torch.save({"model": {**encoder_sd, "mask_token": sd["mask_token"]}}, tmp_path / "mt.pth")
  fx.write_hub_dir(str(tmp_path / "hub_encoder"), encoder)
  encoder.save_pretrained(tmp_path / "saved_encoder")

  config = tiny_config()
  loaded = [load_pretrained(tmp_path / "mae_pretrain_vit_tiny.pth", config),
            load_pretrained(tmp_path / "mt.pth", config),
            load_pretrained(tmp_path / "hub_encoder"),
            load_pretrained(tmp_path / "saved_encoder")]
  for params, cfg in loaded:
    assert set(params) == {"encoder"}
    err = rel_err(encode(params["encoder"], IMAGES, config=cfg), want)
    print(f"encoder rel err {err:.2e}")
    assert err < ENCODER_TOL
  assert loaded[2][1] == tiny_config(mask_ratio=0.0)
  with pytest.raises(ValueError, match="no decoder"):
    mae_apply(loaded[0][0], IMAGES, config=config, noise=NOISE)


def test_pth_architecture_is_inferred(tmp_path):
  hf_config = fx.hf_config(hidden_size=192, num_attention_heads=3, intermediate_size=768,
                           num_hidden_layers=1, decoder_hidden_size=64,
                           decoder_num_attention_heads=16, decoder_intermediate_size=256,
                           decoder_num_hidden_layers=1, layer_norm_eps=1e-6,
                           norm_pix_loss=True, mask_ratio=0.5)
  model = fx.random_model(hf_config, seed=2)
  path = tmp_path / "ti.pth"
  torch.save({"model": fx.reference_state_dict(model),
              "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.5, lr=1e-3)}, path)
  params, config = load_pretrained(path)
  assert config == model_config("Ti/16", image_size=32, patch_size=8, depth=1, decoder_width=64,
                                decoder_depth=1, norm_pix_loss=True, mask_ratio=0.5)
  assert_matches_torch(params, config, fx.pretraining_outputs(model, IMAGES, NOISE))


@pytest.mark.parametrize("ours,theirs", [(("encoder", "blocks_0"), "vit.layers.0"),
                                         (("decoder", "decoder_blocks_1"),
                                          "decoder.decoder_layers.1")],
                         ids=["encoder", "decoder"])
def test_block_matches_torch_where_layer_norm_eps_matters(pth, hub_dir, ours, theirs):
  """One block on inputs of variance 1e-4, where LayerNorm's eps (1e-12 here) is not lost
  in the variance: eps 1e-6 moves the output by ~1e-2, tanh GELU by ~2e-4."""
  config = tiny_config()
  params = load_pretrained(pth[0], config)[0][ours[0]][ours[1]]
  width, mlp_dim = params["mlp"]["fc1"]["kernel"].shape
  heads = config.num_heads if ours[0] == "encoder" else config.decoder_num_heads
  x = 1e-2 * np.random.RandomState(3).randn(2, 17, width).astype(np.float32)  # [B, 1 + N, D]
  with torch.no_grad():
    want = hub_dir[1].get_submodule(theirs)(torch.from_numpy(x)).numpy()
  got = Block(heads, mlp_dim, config.layer_norm_eps).apply({"params": params}, x)
  err = rel_err(got, want)
  print(f"{theirs} rel err {err:.2e}")
  assert err < ENCODER_TOL


def test_half_precision_files_load_as_float32(hub_dir, tmp_path):
  _, model = hub_dir
  hub_bf16 = {k: v.bfloat16() for k, v in fx.hub_state_dict(model).items()}
  fx.write_hub_dir(str(tmp_path / "bf16"), model)
  save_file(hub_bf16, tmp_path / "bf16" / "model.safetensors")  # replaces the float32 weights
  ref_f16 = {k: v.half() for k, v in fx.reference_state_dict(model).items()}
  torch.save({"model": ref_f16}, tmp_path / "f16.pth")
  for params, want in [(load_pretrained(tmp_path / "bf16")[0],
                        hub_bf16["vit.encoder.layer.1.output.dense.weight"]),
                       (load_pretrained(tmp_path / "f16.pth", tiny_config())[0],
                        ref_f16["blocks.1.mlp.fc2.weight"])]:
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(params["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  want.float().numpy().T)


@pytest.fixture(scope="module")
def pth(tmp_path_factory, hub_dir):
  """An official-format .pth of the tiny model and its reference state dict."""
  sd = fx.reference_state_dict(hub_dir[1])
  path = tmp_path_factory.mktemp("pth") / "mae.pth"
  torch.save({"model": sd}, path)
  return path, sd


@pytest.mark.parametrize("field,value,found", [
    ("width", 128, 64), ("depth", 3, 2), ("patch_size", 16, 8), ("image_size", 64, 32),
    ("decoder_width", 64, 32), ("decoder_depth", 1, 2), ("mlp_dim", 128, 256)])
def test_config_mismatch_names_the_field(pth, field, value, found):
  overrides = {"mlp_ratio": value / 64} if field == "mlp_dim" else {field: value}
  with pytest.raises(ValueError, match=rf"{field}: config {value}, \S*mae.pth {found}"):
    load_pretrained(pth[0], tiny_config(**overrides))


def test_unknown_width_needs_a_config(pth):
  with pytest.raises(ValueError, match="width 64 .* pass a config"):
    load_pretrained(pth[0])


def save(tmp_path, sd):
  path = tmp_path / "edited.pth"
  torch.save({"model": sd}, path)
  return path


def test_bad_state_dicts_are_refused(pth, tmp_path):
  _, sd = pth
  config = tiny_config()
  edited = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  edited["head.weight"] = torch.zeros(10, 64)
  with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias.*"
                                       r"unexpected keys: head\.weight"):
    load_pretrained(save(tmp_path, edited), config)
  learned = {**sd, "decoder_pos_embed": sd["decoder_pos_embed"] + 0.01}
  with pytest.raises(ValueError, match="decoder_pos_embed is not the fixed 2D sin-cos"):
    load_pretrained(save(tmp_path, learned), config)
  wrong = {**sd, "blocks.1.norm2.weight": torch.ones(32)}
  with pytest.raises(ValueError, match=r"blocks_1.*norm2.*scale.* \(32,\)"):
    load_pretrained(save(tmp_path, wrong), config)


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu_new"), ("qkv_bias", False),
                                       ("decoder_intermediate_size", 64),
                                       ("image_size", [32, 48]), ("model_type", "vit")])
def test_unrepresentable_hugging_face_config(hub_dir, tmp_path, key, value):
  path, _ = hub_dir
  with open(os.path.join(path, "config.json")) as f:
    config = {**json.load(f), key: value}
  os.makedirs(tmp_path / "hf")
  with open(tmp_path / "hf" / "config.json", "w") as f:
    json.dump(config, f)
  os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "hf" / "model.safetensors")
  with pytest.raises(ValueError, match=f"{key} .*cannot represent"):
    load_pretrained(tmp_path / "hf")


def test_hugging_face_dir_checks_the_given_config(hub_dir):
  with pytest.raises(ValueError, match="num_heads: config 2, config.json 4"):
    load_pretrained(hub_dir[0], tiny_config(num_heads=2))
  _, config = load_pretrained(hub_dir[0], tiny_config(mask_ratio=0.5))
  assert config.mask_ratio == 0.5  # training options come from the given config


class Payload:
  """Pickles as a call of `fn(arg)`: what a malicious checkpoint runs on plain unpickling."""

  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def test_pickled_code_is_refused(hub_dir, tmp_path):
  marker = tmp_path / "marker"
  # A real torch.save file whose args run a shell command.
  pth = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.zeros(2)}, "args": Payload(os.system, f"touch {marker}")},
             pth)
  with pytest.raises(pickle.UnpicklingError, match=r"refusing .*'posix\.system'") as e:
    load_pretrained(pth)
  assert str(pth) in str(e.value)
  # A Hugging Face directory whose pytorch_model.bin runs Python.
  hf = tmp_path / "hf"
  os.makedirs(hf)
  os.symlink(os.path.join(hub_dir[0], "config.json"), hf / "config.json")
  with zipfile.ZipFile(hf / "pytorch_model.bin", "w") as z:
    z.writestr("archive/data.pkl",
               pickle.dumps(Payload(exec, f"open({str(marker)!r}, 'w').close()"), protocol=2))
    z.writestr("archive/version", "3\n")
  with pytest.raises(pickle.UnpicklingError, match=r"'(__builtin__|builtins)\.exec'"):
    load_pretrained(hf)
  # A plain (non-zip) pickle is not unpickled at all.
  with open(tmp_path / "plain.pth", "wb") as f:
    pickle.dump(Payload(os.system, f"touch {marker}"), f)
  with pytest.raises(ValueError, match="not in torch's zip format"):
    load_pretrained(tmp_path / "plain.pth")
  assert not marker.exists()


def test_safe_load_torch_rebuilds_tensors(tmp_path):
  base = torch.randn(4, 6)
  tensors = {"f32": base, "transposed": base.t(), "offset": base[1:, 2:5], "f16": base.half(),
             "bf16": base.bfloat16(), "f64": base.double(), "i64": torch.arange(5),
             "bool": base > 0, "param": torch.nn.Parameter(base[2]), "empty": torch.zeros(0, 3)}
  torch.save({**tensors, "nested": [base[3], (1, "a")], "args": argparse.Namespace(lr=0.1)},
             tmp_path / "t.pth")
  got = torch_zip.safe_load_torch(tmp_path / "t.pth")
  for key, t in tensors.items():
    want = t.detach().float().numpy() if key == "bf16" else t.detach().numpy()
    assert got[key].shape == want.shape and got[key].dtype.itemsize == t.element_size(), key
    np.testing.assert_array_equal(got[key].astype(want.dtype), want, err_msg=key)
  np.testing.assert_array_equal(got["nested"][0], base[3].numpy())
  assert got["nested"][1] == (1, "a") and got["args"].lr == 0.1
  assert not got["f32"].flags.writeable  # views of the file's storages

  # A storage shorter than its tensors is an error, never a read past its end.
  with zipfile.ZipFile(tmp_path / "t.pth") as src, \
      zipfile.ZipFile(tmp_path / "short.pth", "w") as dst:
    for item in src.infolist():
      data = src.read(item)
      dst.writestr(item, data[:8] if item.filename.endswith("/data/0") else data)
  with pytest.raises(pickle.UnpicklingError,
                     match="short.pth: storage 0 has 8 bytes, not the 96 of 24 float32"):
    torch_zip.safe_load_torch(tmp_path / "short.pth")


def test_training_checkpoint_args_and_metadata_load(tmp_path):
  """A training checkpoint's args stay attribute-accessible; state dicts keep their _metadata."""
  model = torch.nn.Linear(2, 3)
  torch.save({"model": model.state_dict(), "epoch": 3, "empty": argparse.Namespace(),
              "args": argparse.Namespace(mask_ratio=0.5, norm_pix_loss=True, lr=1e-3)},
             tmp_path / "checkpoint-3.pth")
  first, second = (torch_zip.safe_load_torch(tmp_path / "checkpoint-3.pth") for _ in range(2))
  args = first["args"]
  assert isinstance(args, argparse.Namespace) and args.mask_ratio == 0.5 and args.norm_pix_loss
  assert vars(args) == {"mask_ratio": 0.5, "norm_pix_loss": True, "lr": 1e-3}
  assert first["empty"] == argparse.Namespace() and first["epoch"] == 3
  # Each load has its own namespace class, never argparse's.
  assert type(args) is not argparse.Namespace and type(args) is not type(second["args"])
  assert first["model"]._metadata == model.state_dict()._metadata
  np.testing.assert_array_equal(first["model"]["weight"], model.weight.detach().numpy())


def write_pth(path, pkl: bytes, storages=(), compression=zipfile.ZIP_STORED):
  """A torch-style zip of data.pkl and data/N storages, entries written with `compression`."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl, compression)
    for i, data in enumerate(storages):
      z.writestr(f"archive/data/{i}", data, compression)
  return path


def build(target: str, state, new: bool = False) -> bytes:
  """A pickle giving the global `target` (with `new`, a new instance of it) `state` by BUILD."""
  module, name = target.rsplit(".", 1)
  return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + (b")\x81" if new else b"")
          + pickle.dumps(state, protocol=2)[2:-1] + b"b.")


@pytest.mark.parametrize("target,state", [
    ("argparse.Namespace", (None, {"__init__": collections.OrderedDict})),
    ("argparse.Namespace", (None, {"__repr__": collections.OrderedDict})),
    ("torch._utils._rebuild_tensor_v2", {"seen": True}),
    ("torch._utils._rebuild_tensor_v2", (None, {"__defaults__": (1,)})),
    ("torch._utils._rebuild_parameter", (None, {"__code__": None})),
    ("collections.OrderedDict", (None, {"__init__": collections.OrderedDict}))])
def test_pickle_build_cannot_change_shared_objects(tmp_path, target, state):
  path = write_pth(tmp_path / "build.pth", build(target, state))
  with pytest.raises(pickle.UnpicklingError, match=f"refusing to set the state of {target}"):
    torch_zip.safe_load_torch(path)
  assert argparse.ArgumentParser().parse_args([]) == argparse.Namespace()
  assert repr(argparse.Namespace(a=1)) == "Namespace(a=1)"
  assert vars(torch_zip._rebuild_tensor) == {} and torch_zip._rebuild_tensor.__defaults__ is None


@pytest.mark.parametrize("state,error", [
    ((None, {"lr": 1}), "refusing a tuple as the state of a Namespace"),
    ({"__eq__": None}, "refusing the attribute '__eq__' of a Namespace"),
    ({1: 2}, "refusing the attribute 1 of a Namespace")])
def test_pickle_build_only_sets_attributes_of_new_objects(tmp_path, state, error):
  path = write_pth(tmp_path / "new.pth", build("argparse.Namespace", state, new=True))
  with pytest.raises(pickle.UnpicklingError, match=error):
    torch_zip.safe_load_torch(path)
  path = write_pth(tmp_path / "ok.pth", build("argparse.Namespace", {"lr": 1}, new=True))
  assert torch_zip.safe_load_torch(path) == argparse.Namespace(lr=1)


def test_pickle_extension_codes_are_refused(tmp_path):
  """An extension code already in copyreg's cache would be handed out without find_class."""
  copyreg.add_extension("os", "getcwd", 240)
  try:
    assert pickle.loads(b"\x80\x02\x82\xf0.") is os.getcwd  # cached for the whole process
    with pytest.raises(pickle.UnpicklingError, match="refusing a pickle extension code"):
      torch_zip.safe_load_torch(write_pth(tmp_path / "ext.pth", b"\x80\x02\x82\xf0)R."))
  finally:
    copyreg.remove_extension("os", "getcwd", 240)


# The unpickler's whole allowlist: what torch.save writes for tensors, parameters, state
# dicts and training args. Anything else could be a gadget (getattr on an allowed object
# reaches os.system through its __globals__).
ALLOWED_GLOBALS = {
    "collections.OrderedDict", "argparse.Namespace", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    *(f"torch.{kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int",
                                          "Short", "Char", "Byte", "Bool"))}

GADGETS = [
    "builtins.getattr", "builtins.setattr", "builtins.delattr", "builtins.__import__",
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.globals",
    "builtins.vars", "builtins.type", "builtins.object", "builtins.breakpoint",
    "__builtin__.getattr", "__builtin__.eval", "operator.attrgetter", "operator.methodcaller",
    "operator.itemgetter", "operator.getitem", "functools.partial", "functools.reduce",
    "types.FunctionType", "types.CodeType", "types.MethodType", "os.system", "posix.system",
    "os.popen", "os.execv", "subprocess.Popen", "subprocess.run", "subprocess.check_output",
    "importlib.import_module", "pickle.loads", "pickle._loads", "_pickle.loads",
    "marshal.loads", "runpy.run_path", "ctypes.CDLL", "shutil.rmtree", "sys.modules",
    "copyreg._reconstructor", "copyreg.__newobj__", "collections.defaultdict",
    "argparse.ArgumentParser", "torch.load", "torch.Tensor", "torch._utils._rebuild_tensor",
    "torch._tensor._rebuild_from_type_v2", "numpy.load", "numpy.frombuffer",
    "numpy.core.multiarray._reconstruct",
    # Near misses of allowed names: attributes reached through them, other modules.
    "collections.OrderedDict.__init__", "argparse.Namespace.__init__",
    "torch.FloatStorage.__class__", "torch._utils._rebuild_tensor_v2.__globals__",
    "torch.storage.FloatStorage", "collections.abc.OrderedDict"]


def global_pickle(target: str, opcode: str) -> bytes:
  """A pickle calling the global `target` with one string argument: GLOBAL (protocol 2, as
  torch.save writes) or STACK_GLOBAL (protocol 4, names with dots resolved attribute by
  attribute by plain pickle)."""
  module, name = target.rsplit(".", 1) if opcode == "GLOBAL" else target.split(".", 1)
  if opcode == "GLOBAL":
    head = b"\x80\x02c" + f"{module}\n{name}\n".encode()
  else:
    head = b"\x80\x04" + b"".join(b"\x8c" + bytes([len(t)]) + t.encode() for t in (module, name))
    head += b"\x93"
  return head + b"\x8c\x01x\x85R."


def test_every_allowed_global_loads(tmp_path):
  """One torch.save file that uses every allowed global, and nothing else, loads right."""
  base = torch.arange(6.).reshape(2, 3)
  tensors = {kind: base.to(getattr(torch, kind)) for kind in (
      "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
      "uint8", "bool")}
  with_state = torch.nn.Parameter(base.clone())
  with_state.note = "kept out"  # a parameter with attributes pickles with its state
  torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "tensors": tensors,
              "param": torch.nn.Parameter(base.clone()), "with_state": with_state,
              "args": argparse.Namespace(lr=0.5)}, tmp_path / "all.pth")
  with zipfile.ZipFile(tmp_path / "all.pth") as z:
    pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
  used = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pkl)
          if op.name == "GLOBAL"}
  assert used == ALLOWED_GLOBALS
  got = torch_zip.safe_load_torch(tmp_path / "all.pth")
  for kind, t in tensors.items():
    want = t.float() if kind == "bfloat16" else t
    np.testing.assert_array_equal(got["tensors"][kind].astype(want.numpy().dtype), want.numpy())
    assert got["tensors"][kind].dtype.itemsize == t.element_size(), kind
  for key in ("param", "with_state"):
    np.testing.assert_array_equal(got[key], base.numpy())
  assert list(got["model"]) == ["weight", "bias"] and got["args"].lr == 0.5


@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL"])
def test_gadget_globals_are_refused(tmp_path, opcode):
  admitted = []
  for target in GADGETS:
    path = write_pth(tmp_path / "gadget.pth", global_pickle(target, opcode))
    try:
      torch_zip.safe_load_torch(path)
      admitted.append(target)
    except pickle.UnpicklingError as e:
      module, name = target.rsplit(".", 1) if opcode == "GLOBAL" else target.split(".", 1)
      assert f"refusing to load the global '{module}.{name}'" in str(e), (target, str(e))
  assert not admitted


def test_allowlist_is_exactly_the_expected_globals():
  """Every global of every module loaded in this process, asked of the unpickler: only the
  allowlist is admitted."""
  buffer = io.BytesIO()
  zipfile.ZipFile(buffer, "w").close()
  unpickler = torch_zip._RestrictedUnpickler(io.BytesIO(), zipfile.ZipFile(buffer), "")
  candidates = {(m, n) for m, module in list(sys.modules.items())
                for n in list(getattr(module, "__dict__", {}))}
  candidates |= {tuple(g.rsplit(".", 1)) for g in ALLOWED_GLOBALS}
  admitted = set()
  for module, name in candidates:
    try:
      unpickler.find_class(module, name)
      admitted.add(f"{module}.{name}")
    except pickle.UnpicklingError:
      pass
  assert len(candidates) > 10_000
  assert admitted == ALLOWED_GLOBALS


def test_tiny_files_cannot_claim_huge_memory(tmp_path):
  # torch.save writes an expanded tensor as its 4-byte storage and stride 0: 4 TB as a copy.
  torch.save({"w": torch.zeros(1).expand(10**6, 10**6)}, tmp_path / "expanded.pth")
  torch.save({"w": torch.arange(10.).as_strided((4, 4), (1, 1))}, tmp_path / "overlap.pth")
  for name in ("expanded", "overlap"):
    with pytest.raises(pickle.UnpicklingError, match="expanded or overlapping tensors are not "
                                                     "supported"):
      torch_zip.safe_load_torch(tmp_path / f"{name}.pth")
  # A protocol 5 bytearray's declared size would be allocated before reading it.
  path = write_pth(tmp_path / "bytearray.pth", b"\x80\x05\x96" + struct.pack("<Q", 2**50) + b".")
  with pytest.raises(pickle.UnpicklingError, match="refusing a protocol 5 bytearray"):
    torch_zip.safe_load_torch(path)


def test_zip_entries_must_be_stored_and_sized(tmp_path):
  torch.save({"w": torch.ones(2, 3)}, tmp_path / "t.pth")
  with zipfile.ZipFile(tmp_path / "t.pth") as z:
    pkl, storage = z.read("t/data.pkl"), z.read("t/data/0")
  # Deflate could make a tiny entry expand to gigabytes; torch never compresses.
  path = write_pth(tmp_path / "deflated.pth", pkl, [storage], zipfile.ZIP_DEFLATED)
  with pytest.raises(pickle.UnpicklingError, match="archive/data.pkl is compressed"):
    torch_zip.safe_load_torch(path)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/data/0", storage, zipfile.ZIP_DEFLATED)
  with pytest.raises(pickle.UnpicklingError, match="archive/data/0 is compressed"):
    torch_zip.safe_load_torch(path)
  path = write_pth(tmp_path / "long.pth", pkl, [storage + bytes(8)])
  with pytest.raises(pickle.UnpicklingError, match="storage 0 has 32 bytes, not the 24 of 6 "):
    torch_zip.safe_load_torch(path)
  # A central directory listing the same data thrice: overlapping entries outsize the file.
  with zipfile.ZipFile(tmp_path / "overlap.pth", "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/data/0", bytes(4096))
    z.filelist += [copy.copy(z.getinfo("archive/data/0")) for _ in range(2)]
  with pytest.raises(ValueError, match="overlap.pth: not a torch checkpoint \\(its zip entries "
                                       "overlap\\)"):
    torch_zip.safe_load_torch(tmp_path / "overlap.pth")
  assert torch_zip.safe_load_torch(write_pth(tmp_path / "ok.pth", pkl, [storage]))["w"].sum() == 6


def test_command_line_converts_and_never_overwrites(hub_dir, pth, tmp_path, capsys):
  src, _ = hub_dir
  dst = tmp_path / "converted"
  run = subprocess.run([sys.executable, "-m", "mae_jax.convert", src, str(dst)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert "parameters" in run.stdout
  want, want_config = load_pretrained(src)
  got, got_config = load_pretrained(dst)
  assert got_config == want_config
  assert_trees_equal(got, want)
  with pytest.raises(ValueError, match="num_heads: config 2"):
    load_pretrained(dst, dataclasses.replace(want_config, num_heads=2))

  before = sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, ps in os.walk(dst)
                  for p in ps)
  with pytest.raises(SystemExit) as e:
    convert.main([str(pth[0]), str(dst)])
  assert e.value.code == 2 and "refusing to overwrite" in capsys.readouterr().err
  assert sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, ps in os.walk(dst)
                for p in ps) == before

  flags = ["--image_size", "32", "--patch_size", "8", "--width", "64", "--depth", "2",
           "--num_heads", "4", "--decoder_width", "32", "--decoder_depth", "2",
           "--decoder_num_heads", "4", "--layer_norm_eps", "1e-12", "--norm_pix_loss", "false"]
  assert convert.main([str(pth[0]), str(tmp_path / "from_pth"), *flags]) == 0
  assert_trees_equal(load_pretrained(tmp_path / "from_pth")[0],
                     load_pretrained(pth[0], tiny_config())[0])
