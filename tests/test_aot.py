"""Ahead-of-time planning for TPU slices: slice names, the max-batch search, bad input, the
command line's exits, the DCN transfers read from HLO, and (with libtpu installed) a tiny
model compiled for v5e:2x2, whose memory report is checked against the arrays' own sizes,
and for 2 x v5e:2x2, whose cross-slice traffic is checked against the gradients' size.

Every compile for a slice runs in a subprocess, so that libtpu's TPU runtime never starts in
this process, which keeps its 8 fake CPU devices.
"""
import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import demo
from mae_jax import aot, dcn, metrics, sharding, tasks
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
  assert mesh.shape == {"slice": 1, "data": 2, "fsdp": 2}
  assert set(mesh.devices.flat) == set(devices)
  with pytest.raises(ValueError, match="fsdp axis size 3 does not divide the 4 devices$"):
    sharding.make_mesh(3, devices)


def test_slices_of_devices_without_slice_index():
  """CPU (and GPU) devices carry no slice_index: num_slices splits them, process by
  process; 0 means one slice."""
  mesh = sharding.make_mesh(2, num_slices=2)
  assert mesh.shape == {"slice": 2, "data": 2, "fsdp": 2}
  assert [sorted(d.id for d in s.flat) for s in mesh.devices] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert sharding.make_mesh().shape == {"slice": 1, "data": 8, "fsdp": 1}
  with pytest.raises(ValueError, match="num_slices=3 does not divide the 8 devices"):
    sharding.make_mesh(num_slices=3)
  with pytest.raises(ValueError, match=r"fsdp axis size 8 does not divide the 4 devices of "
                     r"a slice \(2 slices\)"):
    sharding.make_mesh(8, num_slices=2)


def tiny_config(**extra):
  config = demo.get_config().unlock()
  for key, value in {**TINY, **extra}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.lock()


@pytest.mark.parametrize("topology,slices,extra,message", [
    ("v9-8", 1, {}, "unknown TPU topology 'v9-8'"),
    ("v5e:2x2", 1, {"fsdp": 3}, "--config.fsdp=3 does not divide the 4 chips of v5e:2x2$"),
    ("v5e:2x2", 2, {"fsdp": 8}, r"--config.fsdp=8 does not divide the 4 chips of v5e:2x2 "
     r"\(FSDP stays inside a slice\)"),
    ("v5e:2x2", 0, {}, "--num_slices=0: a job spans 1 or more slices"),
    ("v5e:2x2", 4, {"num_slices": 2}, "--config.num_slices=2 contradicts --num_slices=4"),
    ("v5e:2x4", 1, {"batch_size": 36}, "global batch size 36 is not divisible by the 8 devices"),
    ("v5e:2x2", 2, {"batch_size": 36}, "global batch size 36 is not divisible by the 8 devices"),
    ("v5e:2x4", 1, {"grad_accum_steps": 2, "batch_size": 40},
     "by the 8 devices x 2 gradient accumulation"),
    ("v5e:2x2", 1, {"model.mask_ratio": 1.5}, "mask_ratio"),
])
def test_bad_input_before_libtpu(monkeypatch, topology, slices, extra, message):
  def no_devices(*_):
    raise AssertionError("libtpu was asked for devices before the input was checked")
  monkeypatch.setattr(aot, "compile_devices", no_devices)
  with pytest.raises(ValueError, match=message):
    config = tiny_config(**extra)
    aot.check_request(config, topology, False, 8, slices)
    aot.Planner(config, topology, slices)


def test_bad_search_resolution():
  with pytest.raises(ValueError, match="--batch_resolution=3 must be a positive multiple of "
                     r"grad_accum_steps \(2\)"):
    aot.check_request(tiny_config(grad_accum_steps=2), "v5e:2x2", True, 3)
  aot.check_request(tiny_config(batch_size=36), "v5e:2x4", True, 8)  # the search's start only


def test_state_bytes_and_a_model_that_cannot_fit(monkeypatch):
  """Per-chip parameter and optimizer bytes follow the fsdp shardings; a model whose state
  alone exceeds HBM is refused before compiling. (Planned over fake CPU devices standing in
  for the slice's chips: only the compile needs libtpu's.)"""
  monkeypatch.setattr(aot, "compile_devices", lambda s, n: jax.devices()[:s.num_chips * n])
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


MULTI_SLICE_SCRIPT = """
import json, sys
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from configs import demo
from mae_jax import aot, sharding
from mae_jax.topology import compile_devices, parse_slice
devices = compile_devices(parse_slice("v5e:2x2"), 2)
mesh = sharding.make_mesh(2, devices)
def owners(s, shape):  # per device: its slice, where its block of the array starts
  return [(d.slice_index, [i.start or 0 for i in index])
          for d, index in s.devices_indices_map(shape).items()]
out = dict(shape=dict(mesh.shape), mesh_slices=[[d.slice_index for d in s.flat]
                                                 for s in mesh.devices],
           batch=owners(sharding.batch_sharding(mesh), (16,)),
           param=owners(sharding.param_sharding(mesh, (8, 6)), (8, 6)), refused=[])
for kwargs in (dict(fsdp=8), dict(num_slices=3), dict(devices=devices[:6])):
  try:
    sharding.make_mesh(**{"devices": devices, **kwargs})
  except ValueError as e:
    out["refused"].append(str(e))
config = demo.get_config().unlock()
config.model.update(json.loads(sys.argv[1]))
config.batch_size = 64
for k in (1, 2):
  config.grad_accum_steps = k
  r = aot.Planner(config, "v5e:2x2", num_slices=2).compile(8)
  out[k] = dict(transfers=[(t.kind, t.payload, t.count) for t in r.dcn], sent=r.dcn_bytes,
                params=r.params_bytes, fits=r.fits, chips_per_host=r.chips_per_host,
                dcn_gbps=r.dcn_gbps)
x = jax.ShapeDtypeStruct((1024, 128), "float32", sharding=NamedSharding(mesh, P("slice")))
gather = jax.jit(lambda x: 2 * x, out_shardings=NamedSharding(mesh, P())).lower(x).compile()
out["gather"] = [(t.kind, t.payload, t.count) for t in aot.dcn.transfers(gather.as_text())]
print("JSON" + json.dumps(out))
"""


@needs_libtpu
def test_two_slices_of_v5e():
  """2 x v5e:2x2 with fsdp 2: the 'slice' axis is the devices' slice_index, FSDP splits a
  parameter inside each slice (both slices hold the same halves), the batch is split over
  both; an fsdp size beyond a slice, a slice count the devices lack and uneven slices are
  refused. The compiled step's cross-slice traffic is the all-reduce of the float32
  gradients: each chip sends its quarter (the slice reduce-scatters them first), so a
  slice's 4 chips together send every gradient once, plus TPU tile padding and the
  metrics; an all-gather across slices is read as one too."""
  model = {"image_size": 32, "width": 128, "depth": 1, "num_heads": 2, "decoder_width": 128,
           "decoder_depth": 1, "decoder_num_heads": 2}
  out = run(["-c", MULTI_SLICE_SCRIPT, json.dumps(model)])
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.split("JSON", 1)[1])
  assert r["shape"] == {"slice": 2, "data": 2, "fsdp": 2}
  assert r["mesh_slices"] == [[0] * 4, [1] * 4]
  # 16 rows: slice 0's chips hold 2 each of the first 8, slice 1's the rest.
  assert sorted((s, row) for s, (row,) in r["batch"]) == [
      (s, row) for s in (0, 1) for row in range(8 * s, 8 * s + 8, 2)]
  # An [8, 6] parameter: each slice's 4 chips hold rows 0-3 (2 chips) or 4-7 (the others).
  assert sorted((s, row) for s, (row, _) in r["param"]) == [(s, row) for s in (0, 1)
                                                            for row in (0, 0, 4, 4)]
  assert r["refused"] == ["fsdp axis size 8 does not divide the 4 devices of a slice "
                          "(2 slices)", "num_slices=3, but the 8 devices form 2 slices",
                          "the devices form slices of unequal sizes [2, 4]"]

  task = tasks.make_task(tiny_config(**{f"model.{k}": v for k, v in model.items()}))
  shapes = jax.eval_shape(init_params, task.model, jax.random.key(0))
  grads = sum(x.size * 4 for x in jax.tree.leaves(shapes))  # float32, as the params
  # XLA pads each chip's share of a gradient (and of the metrics) to whole 8 x 128 tiles.
  padding = 4 * (len(jax.tree.leaves(shapes)) + 1) * 8 * 128 * 4
  one = r["1"]
  assert one["fits"] and one["params"] == grads and one["chips_per_host"] == 4
  assert one["dcn_gbps"] == 100  # 25 Gbit/s per v5e chip
  assert {kind for kind, _, _ in one["transfers"]} == {"ALL_REDUCE"}
  payload = sum(p * c for _, p, c in one["transfers"])
  assert grads <= 4 * payload <= grads + padding
  assert one["sent"] == payload  # 2 slices: an all-reduce sends its payload once
  two = r["2"]  # accumulation: the loop's all-reduce of a loss term runs once per micro-step
  assert {c for _, _, c in two["transfers"]} == {1, 2}
  assert grads <= 4 * sum(p * c for _, p, c in two["transfers"]) <= grads + padding
  assert r["gather"] == [["ALL_GATHER", 512 * 128 * 4, 1]]


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
  """mae_jax.main's command line (--workdir included, unused) plus --topology and
  --num_slices."""
  workdir = tmp_path / "run"
  out = aot_cli("--topology=v5litepod-4", "--num_slices=2", "--config.fsdp=2",
                "--dcn_gbps=50", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert not workdir.exists()
  assert ("on 2 x v5e:2x2 (8 chips), fsdp 2, 4 images per chip (global batch 32)"
          in out.stdout)
  assert "of 16.00 GiB: fits" in out.stdout and "model FLOPs per step" in out.stdout
  for line in ("parameters", "optimizer state", "activations/temporaries", "total"):
    assert f"  {line} " in out.stdout
  assert re.search(r"sent over DCN per step  0\.\d\d MiB \(all-reduce\), [0-9.]+ ms at 50 "
                   r"Gbit/s per host of 4 chips: [0-9.]+x the compute at peak, DCN-bound",
                   out.stdout), out.stdout



def test_help_and_one_line_errors():
  """`aot` exits as `main` does: --help on stdout with exit 0 (its example on two lines), and
  each mistake as one line on stderr, exit 1, no usage text; without libtpu too."""
  out = run(["-m", "mae_jax.aot", "--help"])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--config.fsdp=4 \\\n        --config.batch_size=4096" in out.stdout
  # libtpu hidden: `import libtpu` fails as where it is not installed.
  no_libtpu = ("import runpy, sys; sys.modules['libtpu'] = None; sys.argv[0] = 'aot'; "
               "runpy.run_module('mae_jax.aot', run_name='__main__')")
  for args, message in [
      (["-c", no_libtpu, "--config=configs/demo.py", "--topology=v5e:2x2"],
       "compiling for a TPU slice needs libtpu: pip install -e '.[tpu]'"),
      (["-m", "mae_jax.aot", "--config=configs/demo.py", "--topology=v5e:2x4",
        "--config.batch_size=36"], "global batch size 36 is not divisible by the 8 devices x "
       "1 gradient accumulation steps; pick a multiple of 8"),
      (["-m", "mae_jax.aot", "--config=configs/demo.py"],
       "--topology is required, e.g. --topology=v5p-128"),
  ]:
    out = run(args)
    assert (out.returncode, out.stdout, out.stderr) == (1, "", f"error: {message}\n"), args


HLO = """HloModule jit_step, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%loop_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %send.1 = (bf16[4,8]{1,0:T(8,128)(2,1)}, u32[], token[]) send(%x, %t), channel_id=1, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  %r = f32[8]{0} all-reduce(%y), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %r)
}

%loop_condition (p: (s32[], f32[8])) -> pred[] {
  %constant.7 = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %constant.7), direction=LT
}

ENTRY %main.1_spmd (a: f32[8]) -> f32[8] {
  %send = (f32[2,512]{1,0}, u32[], token[]) send(%a, %t), channel_id=2, is_host_transfer=true, \
frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_megascale_transfer_type="ALL_GATHER"}
  %send.2 = (f32[99]{0}, u32[], token[]) send(%a, %t), channel_id=3, is_host_transfer=true, \
frontend_attributes={_xla_host_transfer_handler_name="other_runtime",\
_xla_megascale_transfer_type="ALL_GATHER"}
  %while = (s32[], f32[8]) while(%tuple), condition=%loop_condition, body=%loop_body
  ROOT %out = f32[8] get-tuple-element(%while), index=1
}
""".replace("\\\n", "")


def test_dcn_transfers_from_hlo():
  """Megascale sends only, each counted once per run of its computation: a loop's body
  runs its trip count (`i < 3`) times."""
  transfers = dcn.transfers(HLO)
  assert transfers == [dcn.Transfer("ALL_GATHER", 2 * 512 * 4, 1),
                       dcn.Transfer("ALL_REDUCE", 4 * 8 * 2, 3)]
  known = HLO.replace("body=%loop_body", 'body=%loop_body, backend_config={"known_trip_count"'
                      ':{"n":"5"}}')
  assert dcn.transfers(known)[1].count == 5
  unknown = HLO.replace("constant(3)", "constant(3)\n  %c = s32[] constant(4)")
  assert dcn.transfers(unknown)[1].count is None
  # Ring algorithms over 4 slices: an all-gather sends its shard to 3 others, an all-reduce
  # 2 x 3/4 of its payload.
  assert [t.sent(4) for t in transfers] == [3 * 4096, 1.5 * 64 * 3]


def dcn_report(num_slices, **kwargs):
  """A compiled report of a step that sends 1 MiB per chip across slices per step."""
  fits = aot.Report("v5e:2x2", 4, 1, 8, 16 * GiB, 0, 0, 0, memory=Fits(), oom_message="",
                    flops_per_chip=1.97e12, peak_flops=197e12, compile_seconds=0.0,
                    num_slices=num_slices, **kwargs)
  return aot.format_report(fits, "tiny")


def test_dcn_line_of_the_report():
  """Across slices: bytes per chip, their time at the hosts' bandwidth, and whether that
  exceeds the compute at peak (10 ms here); nothing for one slice."""
  mib = (dcn.Transfer("ALL_REDUCE", 2**20, 1),)
  assert "DCN" not in dcn_report(1)
  assert "on 2 x v5e:2x2 (8 chips), fsdp 1, 8 images per chip (global batch 64)" in (
      dcn_report(2, dcn=mib, dcn_gbps=100))
  assert ("sent over DCN per step  1.00 MiB (all-reduce), 0.336 ms at 100 Gbit/s per host of "
          "4 chips: 0.0336x the compute at peak, compute-bound") in dcn_report(
              2, dcn=mib, dcn_gbps=100)
  # 8 slices: 4 all-reduces of 1 MiB send 2 x 7/8 x 4 MiB.
  assert ("7.00 MiB (all-reduce), 23.5 ms at 10 Gbit/s per host of 4 chips: 2.35x the "
          "compute at peak, DCN-bound") in dcn_report(8, dcn=mib * 4, dcn_gbps=10)
  assert "1.00 MiB (all-reduce); give --dcn_gbps (per host) for its time" in dcn_report(
      2, dcn=mib)
