"""Ahead-of-time planning for TPU slices: slice names, the max-batch search, bad input, and
(with libtpu installed) a tiny model compiled for v5e:2x2 whose memory report is checked
against the arrays' own sizes.

Every compile for a slice runs in a subprocess, so that libtpu's TPU runtime never starts in
this process, which keeps its 8 fake CPU devices.
"""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import demo
from mae_jax import aot, metrics, sharding, tasks
from mae_jax.aot import live_bytes
from mae_jax.mae import init_params
from mae_jax.topology import CHIPS, GiB, parse_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.image_size": 32, "model.width": 32, "model.depth": 1, "model.num_heads": 2,
        "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_num_heads": 2,
        "batch_size": 32}
needs_libtpu = pytest.mark.requires("libtpu")  # conftest: skipped without it, failed in CI


def run(args, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, **kwargs)


def aot_cli(*flags, overrides=TINY):
  return run(["-m", "mae_jax.aot", "--config=configs/demo.py",
              *[f"--config.{k}={v}" for k, v in overrides.items()], *flags])


@pytest.mark.parametrize("name,generation,shape", [
    ("v5p-128", "v5p", (4, 4, 4)), ("v5p-8", "v5p", (2, 2, 1)), ("v4-32", "v4", (2, 2, 4)),
    ("v4-64", "v4", (2, 4, 4)), ("v5litepod-16", "v5e", (4, 4)), ("v5e-4", "v5e", (2, 2)),
    ("v6e-8", "v6e", (2, 4)), ("v6e-256", "v6e", (16, 16)), ("v5e:4x4", "v5e", (4, 4)),
    ("v5p:2x2x1", "v5p", (2, 2, 1)), ("V5P-1024", "v5p", (8, 8, 8)),
])
def test_slice_names(name, generation, shape):
  s = parse_slice(name)
  assert (s.generation, s.shape) == (generation, shape)
  assert s.name == f"{generation}:{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("name,message", [
    ("v7-8", "unknown TPU topology 'v7-8'"), ("v5p-12", "TensorCore counts"),
    ("v5e-2", "chip counts"), ("v5e:4x4x4", "2 positive axes"), ("v4:2x2", "3 positive axes"),
    ("tpu", "unknown TPU topology"),
])
def test_bad_slice_names(name, message):
  with pytest.raises(ValueError, match=message):
    parse_slice(name)


def test_hbm_per_chip():
  assert {g: parse_slice(f"{g}:" + "x".join(["2"] * c.torus_dims)).chip.hbm_bytes / GiB
          for g, c in CHIPS.items()} == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


class Fits:
  """A CompiledMemoryStats stand-in: 1 byte per chip."""
  argument_size_in_bytes = output_size_in_bytes = alias_size_in_bytes = 0
  temp_size_in_bytes, generated_code_size_in_bytes = 1, 0


def fake_compile(limit):
  """A compile_fn whose step fits while the per-chip batch is <= limit, and its calls."""
  calls = []

  def compile_fn(b):
    calls.append(b)
    fits = b <= limit
    return aot.Report("v5e:2x2", 4, 1, b, 16 * GiB, 0, 0, 0, memory=Fits() if fits else None,
                      oom_message="" if fits else "RESOURCE_EXHAUSTED", flops_per_chip=None,
                      peak_flops=None, compile_seconds=0.0)
  return compile_fn, calls


@pytest.mark.parametrize("limit,start,multiple,resolution", [
    (300, 128, 1, 16), (300, 128, 1, 1), (100, 128, 1, 8), (5, 128, 1, 1), (1000, 8, 4, 4),
    (130, 130, 2, 2), (1, 64, 1, 8),
])
def test_find_max_batch(limit, start, multiple, resolution):
  compile_fn, calls = fake_compile(limit)
  best, tried = aot.find_max_batch(compile_fn, start, multiple, resolution)
  assert best.batch_per_chip <= limit < best.batch_per_chip + resolution
  assert best.batch_per_chip % multiple == 0 and best.fits
  assert len(calls) == len(set(calls)) == len(tried)  # nothing compiled twice
  assert len(calls) <= 2 * math.log2(max(limit, start)) + 3
  assert [r.batch_per_chip for r in tried] == sorted(calls)


class LinearMemory:
  """CompiledMemoryStats of a step whose temporaries grow by 50 MiB per image."""
  def __init__(self, b):
    self.argument_size_in_bytes = GiB  # the state
    self.output_size_in_bytes = self.alias_size_in_bytes = self.generated_code_size_in_bytes = 0
    self.temp_size_in_bytes = b * 50 * 2**20


@pytest.mark.parametrize("start,resolution,most", [(128, 8, 4), (128, 1, 10), (512, 8, 5),
                                                  (8, 8, 8)])
def test_find_max_batch_extrapolates(start, resolution, most):
  """Memory linear in the batch: a few compiles find the edge, which XLA (keeping 1/4 GiB of
  HBM for itself) puts below the extrapolated one."""
  calls = []
  def compile_fn(b):
    calls.append(b)
    m = LinearMemory(b)
    oom = GiB + m.temp_size_in_bytes > 15.75 * GiB
    return aot.Report("v5e:2x2", 4, 1, b, 16 * GiB, GiB, 0, 0, memory=None if oom else m,
                      oom_message="RESOURCE_EXHAUSTED" if oom else "", flops_per_chip=None,
                      peak_flops=None, compile_seconds=0.0)
  best, _ = aot.find_max_batch(compile_fn, start, 1, resolution)
  assert best.batch_per_chip <= 302 < best.batch_per_chip + resolution  # 1 + 302 x 50 MiB
  assert len(calls) <= most, calls


def test_find_max_batch_extrapolates_from_the_state_with_its_optimizer_state():
  """One fit at 128: memory beyond the batch-independent part (2 GiB of parameters, 4 GiB of
  optimizer state, 1/4 GiB of program) grows by 50 MiB an image, so the next compile is
  where HBM (16 GiB) is reached: 128 + (16 - 12.5) GiB / 50 MiB = 199.7 -> 199, the edge."""
  class Memory:
    def __init__(self, b):
      self.argument_size_in_bytes = 6 * GiB  # parameters and optimizer state
      self.output_size_in_bytes = self.alias_size_in_bytes = 0
      self.generated_code_size_in_bytes = GiB // 4
      self.temp_size_in_bytes = b * 50 * 2**20

  calls = []
  def compile_fn(b):
    calls.append(b)
    m = Memory(b)
    fits = live_bytes(m) <= 16 * GiB
    return aot.Report("v5e:2x2", 4, 1, b, 16 * GiB, 2 * GiB, 4 * GiB, 0,
                      memory=m if fits else None, oom_message="" if fits else "OOM",
                      flops_per_chip=None, peak_flops=None, compile_seconds=0.0)
  assert live_bytes(Memory(128)) == 12.5 * GiB
  best, _ = aot.find_max_batch(compile_fn, 128, 1, 1)
  assert calls == [128, 199, 200] and best.batch_per_chip == 199


def test_find_max_batch_none_fits():
  compile_fn, calls = fake_compile(limit=2)
  best, tried = aot.find_max_batch(compile_fn, 64, 4, 4)
  assert best is None and calls == [64, 32, 16, 8, 4]
  assert [r.batch_per_chip for r in tried] == [4, 8, 16, 32, 64]


def test_mesh_over_given_devices():
  devices = jax.devices()[2:6]
  mesh = sharding.make_mesh(2, devices)
  assert mesh.shape == {"data": 2, "fsdp": 2} and set(mesh.devices.flat) == set(devices)
  with pytest.raises(ValueError, match="fsdp axis size 3 does not divide the 4 devices"):
    sharding.make_mesh(3, devices)


def tiny_config(**extra):
  config = demo.get_config().unlock()
  for key, value in {**TINY, **extra}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.lock()


@pytest.mark.parametrize("topology,extra,message", [
    ("v9-8", {}, "unknown TPU topology 'v9-8'"),
    ("v5e:2x2", {"fsdp": 3}, "--config.fsdp=3 does not divide the 4 chips"),
    ("v5e:2x4", {"batch_size": 36}, "global batch size 36 is not divisible by the 8 devices"),
    ("v5e:2x4", {"grad_accum_steps": 2, "batch_size": 40}, "by the 8 devices x 2 gradient accumulation"),
    ("v5e:2x2", {"model.mask_ratio": 1.5}, "mask_ratio"),
])
def test_bad_input_before_libtpu(monkeypatch, topology, extra, message):
  def no_devices(_):
    raise AssertionError("libtpu was asked for devices before the input was checked")
  monkeypatch.setattr(aot, "compile_devices", no_devices)
  with pytest.raises(ValueError, match=message):
    config = tiny_config(**extra)
    aot.check_request(config, topology, find_max_batch=False, batch_resolution=8)
    aot.Planner(config, topology)


def test_bad_search_resolution():
  with pytest.raises(ValueError, match="--batch_resolution=3 must be a positive multiple of "
                     r"grad_accum_steps \(2\)"):
    aot.check_request(tiny_config(grad_accum_steps=2), "v5e:2x2", True, 3)
  aot.check_request(tiny_config(batch_size=36), "v5e:2x4", True, 8)  # the search's start only


def test_state_bytes_and_a_model_that_cannot_fit(monkeypatch):
  """Per-chip parameter and optimizer bytes follow the fsdp shardings; a model whose state
  alone exceeds HBM is refused before compiling. (Planned over fake CPU devices standing in
  for the slice's chips: only the compile needs libtpu's.)"""
  monkeypatch.setattr(aot, "compile_devices", lambda s: jax.devices()[:s.num_chips])
  shapes = jax.eval_shape(init_params, tasks.make_task(tiny_config()).model,
                          jax.random.key(0))
  params = sum(x.size * 4 for x in jax.tree.leaves(shapes))
  one, four = (aot.Planner(tiny_config(fsdp=f), "v5e:2x2") for f in (1, 4))
  assert one.params_bytes == params and 2 * params <= one.opt_state_bytes <= 2 * params + 16
  assert params / 4 <= four.params_bytes < params / 2  # most of the weights are split in 4
  assert four.opt_state_bytes - 2 * four.params_bytes == one.opt_state_bytes - 2 * params

  big = {"model.width": 4096, "model.depth": 48, "model.num_heads": 32}
  with pytest.raises(ValueError, match=r"cannot fit even at batch 1: its parameters and "
                     r"optimizer state alone need 1[0-9]{2}\.\d\d GiB per chip, more than the "
                     r"16 GiB of a v5e chip; shard them .* --config.fsdp \(now 1\)"):
    aot.Planner(tiny_config(**big), "v5e:2x2")
  with pytest.raises(ValueError, match="use a larger slice or a smaller model"):
    aot.Planner(tiny_config(**big, fsdp=4), "v5e:2x2")
  aot.Planner(tiny_config(**big, fsdp=8), "v5p:2x4x1")  # 95 GiB chips, state split in 8


COMPILE_SCRIPT = """
import json, sys
from configs import demo
from mae_jax import aot
config = demo.get_config().unlock()
config.model.update(json.loads(sys.argv[1]))
planner = aot.Planner(config.lock(), "v5e:2x2")
out = {}
for b in (8, 2**21):  # 2**21 images of 32x32x3 float32 per chip: 24 GiB, more than HBM
  r = planner.compile(b)
  m = r.memory
  out[b] = dict(params=r.params_bytes, opt_state=r.opt_state_bytes, batch=r.batch_bytes,
                fits=r.fits, total=r.total_bytes, flops=r.flops_per_chip, oom=r.oom_message,
                device_kind=planner.devices[0].device_kind,
                memory=m and {k: getattr(m, k) for k in dir(m) if k.endswith("_in_bytes")})
print("JSON" + json.dumps(out))
"""


@needs_libtpu
def test_compile_for_v5e_matches_the_arrays():
  """fsdp 1 on v5e:2x2: the report's parts are the arrays' own sizes, computed here."""
  model_overrides = {k.split(".")[1]: v for k, v in TINY.items() if k.startswith("model.")}
  out = run(["-c", COMPILE_SCRIPT, json.dumps(model_overrides)])
  assert out.returncode == 0, out.stderr[-3000:]
  reports = json.loads(out.stdout.split("JSON", 1)[1])
  r = reports["8"]
  assert r["device_kind"] == "TPU v5 lite" and r["fits"] and not r["oom"]

  model = tasks.make_task(tiny_config()).model
  shapes = jax.eval_shape(init_params, model, jax.random.key(0))
  params = sum(x.size * 4 for x in jax.tree.leaves(shapes))
  assert r["params"] == params  # fsdp 1: every chip holds all parameters
  assert 2 * params <= r["opt_state"] <= 2 * params + 16  # AdamW mu, nu and step counters
  assert r["batch"] == 8 * 32 * 32 * 3  # one chip's images, uint8 (input.normalize_on_device)
  m = r["memory"]
  arrays = r["params"] + r["opt_state"] + r["batch"]
  # XLA's input buffers are these arrays (+ the step counter), padded to TPU tiles.
  assert arrays < m["argument_size_in_bytes"] <= 1.5 * arrays + 2**20
  # The donated state comes back in place: its outputs alias the inputs.
  assert r["params"] + r["opt_state"] <= m["alias_size_in_bytes"] <= m["output_size_in_bytes"]
  assert r["total"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"] -
                        m["alias_size_in_bytes"] + m["temp_size_in_bytes"] +
                        m["generated_code_size_in_bytes"])
  assert m["temp_size_in_bytes"] > 0
  assert r["flops"] == pytest.approx(8 * metrics.train_flops_per_image(model))

  huge = reports[str(2**21)]
  assert not huge["fits"] and huge["memory"] is None and "HBM" in huge["oom"]


@needs_libtpu
def test_cli_report(tmp_path):
  """mae_jax.main's command line (--workdir included, unused) plus --topology."""
  workdir = tmp_path / "run"
  out = aot_cli("--topology=v5litepod-4", "--config.fsdp=2", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert not workdir.exists()
  assert "on v5e:2x2 (4 chips), fsdp 2, 8 images per chip (global batch 32)" in out.stdout
  assert "of 16.00 GiB: fits" in out.stdout and "model FLOPs per step" in out.stdout
  for line in ("parameters", "optimizer state", "activations/temporaries", "total"):
    assert f"  {line} " in out.stdout

