"""Start-up and diagnostics: the persistent compilation cache (hit for the same program, miss
for a changed one), profiler traces of chosen steps and the report that reads them."""
import gzip
import json
import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import pytest

from mae_jax import compile_cache, trace_report
from mae_jax.trainer import train_and_evaluate
from test_train import NO_RECON, config_with

RUN = {**NO_RECON, "model.depth": 1, "total_steps": 4, "warmup_steps": 1, "log_every_steps": 4,
       "checkpoint_every_steps": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_dir):
  """Three demo runs in a fresh cache directory, each after clearing JAX's in-memory caches
  (as a restart would): the model, the same model again, the model with another loss (same
  parameters and shapes: only the program differs); the first traces steps 2-3. {name: (workdir, the compilation cache line)}."""
  root = tmp_path_factory.mktemp("diagnostics")
  previous = jax.config.jax_compilation_cache_dir
  jax_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
  out = {}
  logger = logging.getLogger("mae_jax")
  level = logger.level
  logger.setLevel(logging.INFO)
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger.addHandler(handler)
  try:
    for name, extra in (("first", {"profile.steps": 2, "profile.first_step": 2}),
                        ("same", {}), ("changed", {"model.norm_pix_loss": False})):
      jax.clear_caches()
      records.clear()
      workdir = str(root / name)
      train_and_evaluate(config_with(demo_dir, **RUN, **extra), workdir)
      lines = [r.getMessage() for r in records if "compilation cache" in r.getMessage()]
      out[name] = (workdir, lines)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    jax_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", previous)
  return out


def test_compilation_cache_hits_the_same_program_and_misses_a_changed_one(runs):
  for name, verdict in (("first", "miss"), ("same", "hit"), ("changed", "miss")):
    lines = runs[name][1]
    assert len(lines) == 1 and lines[0].startswith(f"compilation cache: {verdict}: the train "
                                                   "step"), (name, lines)


def test_cache_directory_setting(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path))
  assert compile_cache.resolve(None) == str(tmp_path)  # the environment's, as JAX's
  assert compile_cache.resolve("~/x") == os.path.expanduser("~/x")
  assert compile_cache.resolve("") is None  # off
  monkeypatch.delenv(compile_cache.ENV_DIR)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.resolve(None) == str(tmp_path / "mae_jax" / "xla")


def test_profile_traces_the_chosen_steps_and_the_report_splits_them(runs, capsys):
  workdir = runs["first"][0]
  assert not os.path.exists(os.path.join(runs["same"][0], "tensorboard", "plugins"))
  profiles = os.path.join(workdir, "tensorboard", "plugins", "profile")
  (run,) = os.listdir(profiles)  # one trace, where TensorBoard's profile plugin looks
  files = os.listdir(os.path.join(profiles, run))
  assert trace_report.TRACE_NAME in files and any(f.endswith(".xplane.pb") for f in files)
  report = trace_report.analyse(workdir)
  assert report.steps == 2 and report.module == "jit_step"
  assert report.device.endswith("device 0")  # one of the 8 CPU devices, not all of them
  assert sum(report.split_us.values()) == pytest.approx(report.step_us, rel=1e-6)
  assert report.split_us["matmuls"] > 0 and report.split_us["elementwise/fusions"] > 0
  assert report.top and all(us > 0 for _, _, us, _ in report.top)
  assert sum(us for _, _, us, _ in report.top) <= report.step_us
  trace_report.main([workdir, "--top", "3"])
  out = capsys.readouterr().out
  assert "2 steps" in out and "host waits" in out and len(out.splitlines()) == 3 + 6 + 1 + 3


def test_bad_profile_setting_is_an_error_before_any_write(tmp_path, demo_dir):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"config.profile.steps must be >= 0 and first_step"):
    train_and_evaluate(config_with(demo_dir, **RUN, **{"profile.first_step": 0,
                                                       "profile.steps": 1}), str(workdir))
  assert not workdir.exists()


def test_report_of_a_gpu_shaped_trace(tmp_path):
  """A trace laid out as XProf writes a GPU's: an 'XLA Ops' line (ops named by HLO, their
  text in long_name, the program from the 'XLA Modules' line) and a stream line with the
  same ops' kernels. Two steps of 10 us: the split is exact, overlaps count once."""
  meta = lambda tid, name: {"ph": "M", "pid": 1, "tid": tid, "name": "thread_name",
                            "args": {"name": name}}
  op = lambda tid, name, ts, dur, **args: {"ph": "X", "pid": 1, "tid": tid, "name": name,
                                           "ts": ts, "dur": dur, "args": args}
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            meta(1, "XLA Modules"), meta(2, "XLA Ops"), meta(3, "Stream #1")]
  for t0 in (0.0, 10.0):
    events += [
        op(1, "jit_step", t0, 9.0),
        op(2, "fusion.1", t0, 2.0, long_name="%fusion.1 = f32[8]{0} fusion(f32[8]{0} %dot.2)"),
        op(2, "custom-call.3", t0 + 2, 3.0, long_name='%custom-call.3 = (bf16[8]{0}, u8[0]{0}) '
           'custom-call(bf16[8]{0} %a), custom_call_target="__cudnn$fmhaSoftmax"'),
        op(2, "gemm_fusion.4", t0 + 5, 2.0),
        op(2, "all-reduce.5", t0 + 6, 3.0),  # 1 us beside the gemm, 2 us exposed
        op(3, "sm90_kernel_xyz", t0 + 5, 2.0, hlo_op="gemm_fusion.4", hlo_module="jit_step"),
    ]
  events.append(op(2, "copy.9", 19.5, 0.5, hlo_module="jit_other"))  # another program
  path = tmp_path / "tensorboard" / "plugins" / "profile" / "2026_01_01_00_00_00"
  path.mkdir(parents=True)
  with gzip.open(path / trace_report.TRACE_NAME, "wt") as f:
    json.dump({"traceEvents": events}, f)
  report = trace_report.analyse(str(tmp_path))
  assert (report.device, report.module, report.steps) == ("/device:GPU:0", "jit_step", 2)
  assert report.step_us == pytest.approx(10.0)
  assert report.split_us == pytest.approx({
      "attention": 3.0, "matmuls": 2.0, "elementwise/fusions": 2.0, "collectives": 2.0,
      "other programs": 0.25, "host waits": 0.75})
  assert [(name, cat) for name, cat, _, _ in report.top[:2]] == [
      ("custom-call.3", "attention"), ("all-reduce.5", "collectives")]
