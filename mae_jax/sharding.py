"""Device mesh and shardings: data parallel over every device, optional FSDP axis.

The mesh has axes ('data', 'fsdp'). Batches are split over both axes. Parameters and
optimizer state are replicated over 'data' and, when the fsdp axis is larger than one,
split over 'fsdp' along their largest dimension that divides evenly (ZeRO-3 style), which
lets ViT-L/H and beyond fit; XLA inserts the all-gathers and reduce-scatters.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes; the
  compile-only devices of a TPU slice for ahead-of-time compilation)."""
  n = len(devices) if devices is not None else jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp axis size {fsdp} does not divide the {n} devices")
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Splits the largest dimension divisible by the fsdp size over 'fsdp'; else replicates."""
  size = mesh.shape["fsdp"]
  if size == 1:
    return replicated(mesh)
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % size == 0 and shape[axis] >= size:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_sharding(mesh: Mesh, abstract_tree):
  """Shardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state)."""
  return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape)), abstract_tree)
