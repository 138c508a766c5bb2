"""Loading official MAE, Hugging Face ViTMAE and Orbax weights: parity, checks and safety.

Reference outputs come from transformers' ViTMAE (PyTorch) with random weights, for the same
images and masking noise.
"""
import argparse
import dataclasses
import json
import os
import pickle
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


def assert_matches_torch(params, config, want):
  loss, logits, mask = want
  out = mae_apply(params, IMAGES, config=config, noise=NOISE)
  np.testing.assert_array_equal(np.asarray(out.mask), mask)
  pred_err, loss_err = rel_err(out.pred, logits), abs(float(out.loss) - loss) / abs(loss)
  print(f"pred rel err {pred_err:.2e}, loss rel err {loss_err:.2e}")
  assert pred_err < 1e-5 and loss_err < 1e-5, (pred_err, loss_err)


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
    assert err < 1e-5
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
  got = convert.safe_load_torch(tmp_path / "t.pth")
  for key, t in tensors.items():
    want = t.detach().float().numpy() if key == "bf16" else t.detach().numpy()
    assert got[key].shape == want.shape and got[key].dtype.itemsize == t.element_size(), key
    np.testing.assert_array_equal(got[key].astype(want.dtype), want, err_msg=key)
  np.testing.assert_array_equal(got["nested"][0], base[3].numpy())
  assert got["nested"][1] == (1, "a") and got["args"].lr == 0.1

  # A storage shorter than its tensors is an error, never a read past its end.
  with zipfile.ZipFile(tmp_path / "t.pth") as src, \
      zipfile.ZipFile(tmp_path / "short.pth", "w") as dst:
    for item in src.infolist():
      data = src.read(item)
      dst.writestr(item, data[:8] if item.filename.endswith("/data/0") else data)
  with pytest.raises(pickle.UnpicklingError, match="short.pth: storage 0 is truncated"):
    convert.safe_load_torch(tmp_path / "short.pth")


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
