"""Test setup: 8 fake CPU devices, so sharding code runs as it would on a pod slice."""
import atexit
import os
import shutil
import tempfile

# Must be set before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and the runs it starts as
# subprocesses: many tests compile the same demo step; a cached executable is the same program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mae_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  """The bundled demo photographs, built once for the session."""
  from mae_jax.data import demo as demo_data
  path = str(tmp_path_factory.mktemp("demo_cache"))
  demo_data.build_demo(path)
  return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, demo_dir):
  """A demo pretraining workdir (tiny MAE, 2 steps), for the tasks that start from one."""
  from mae_jax.trainer import train_and_evaluate
  from test_train import config_with
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  train_and_evaluate(config_with(demo_dir, stop_at_step=2), workdir)
  return workdir
