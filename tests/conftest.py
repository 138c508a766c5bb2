"""Test setup: 8 fake CPU devices, so sharding code runs as it would on a pod slice."""
import os

# Must be set before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  """The bundled demo photographs, built once for the session."""
  from mae_jax.data import demo as demo_data
  path = str(tmp_path_factory.mktemp("demo_cache"))
  demo_data.build_demo(path)
  return path
