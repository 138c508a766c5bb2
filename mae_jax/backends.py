"""Keeps libtpu quiet on machines without a TPU.

With libtpu installed (the `tpu` extra, which `mae_jax.aot` needs), JAX tries its TPU backend
first in every process; where no TPU chip is attached libtpu then prints five lines of
complaints (host bounds, worker hostnames) before JAX falls back to the GPU or the CPU.
`skip_absent_tpu()` replaces JAX's TPU backend factory, on such machines only, with one that
declines at once: the same fallback, without libtpu initialising. A TPU VM (TPU device files,
or Google's PCI vendor id), an explicit JAX_PLATFORMS or JAX_FORCE_TPU_INIT leave JAX as it
is. `mae_jax.aot` is unaffected: it loads libtpu itself for its compile-only devices.
"""
from __future__ import annotations

import glob
import os

import jax
from jax.extend import backend as jax_backend

GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_may_be_attached() -> bool:
  """True unless this machine surely has no TPU chip: no device file libtpu opens (/dev/accel*
  up to v4, /dev/vfio/<n> from v5) and no PCI device of Google's."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    with open(vendor) as f:
      if f.read().strip() == GOOGLE_PCI_VENDOR:
        return True
  return False


def _decline(*_, **__):
  raise RuntimeError("no TPU chip on this machine")


def skip_absent_tpu() -> None:
  """Where no TPU chip is attached and the platforms are JAX's choice, JAX skips its TPU
  backend without loading libtpu. Call before JAX picks its backends (importing mae_jax does)."""
  if (jax.config.jax_platforms or os.environ.get("JAX_FORCE_TPU_INIT")
      or tpu_may_be_attached()):
    return
  # The priority and quiet failure of JAX's own registration (jax._src.xla_bridge).
  jax_backend.register_backend_factory("tpu", _decline, priority=300, fail_quietly=True)
