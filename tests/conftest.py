"""Test setup: 8 fake CPU devices, so sharding code runs as it would on a pod slice."""
import os

# Must be set before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
