"""Device mesh and shardings: data parallel over every device, optional FSDP inside a slice.

The mesh has axes ('slice', 'data', 'fsdp'). 'slice' runs across TPU slices (their chips
talk over the data-center network, DCN); 'data' and 'fsdp' run inside a slice (over the
chips' interconnect, ICI). Batches are split over all three axes. Parameters and optimizer
state are replicated over 'slice' and 'data' and, when the fsdp axis is larger than one,
split over 'fsdp' along their largest dimension that divides evenly (ZeRO-3 style), which
lets ViT-L/H and beyond fit; XLA inserts the all-gathers and reduce-scatters, and only the
gradients' all-reduce over 'slice' crosses the DCN. One slice is a 'slice' axis of size 1.
"""
from __future__ import annotations

import collections
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp")
BATCH_AXES = MESH_AXES


def device_slices(devices: Sequence[jax.Device], num_slices: int = 0) -> int:
  """How many slices `devices` form: as their `slice_index` says (TPU), which `num_slices`
  > 0 must agree with; devices without one (CPU) form `num_slices` equal groups in process
  order (1 when `num_slices` is 0)."""
  if num_slices < 0:
    raise ValueError(f"num_slices must be >= 1 (or 0: as the devices say), got {num_slices}")
  if not hasattr(devices[0], "slice_index"):
    if num_slices and len(devices) % num_slices:
      raise ValueError(f"num_slices={num_slices} does not divide the {len(devices)} devices")
    return num_slices or 1
  sizes = collections.Counter(d.slice_index for d in devices).values()
  if num_slices and num_slices != len(sizes):
    raise ValueError(f"num_slices={num_slices}, but the {len(devices)} devices form "
                     f"{len(sizes)} slice{'s' if len(sizes) > 1 else ''}")
  if len(set(sizes)) > 1:
    raise ValueError(f"the devices form slices of unequal sizes {sorted(set(sizes))}")
  return len(sizes)


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None,
              num_slices: int = 0) -> Mesh:
  """A ('slice', 'data', 'fsdp') mesh over `devices` (default: all devices of all processes;
  the compile-only devices of TPU slices for ahead-of-time compilation). `num_slices`: 0
  for as many as the devices form (see `device_slices`)."""
  devices = list(jax.devices() if devices is None else devices)
  slices = device_slices(devices, num_slices)
  n = len(devices) // slices
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp axis size {fsdp} does not divide the {n} devices" +
                     (f" of a slice ({slices} slices)" if slices > 1 else ""))
  axis_types = (AxisType.Auto,) * 3
  if slices == 1:  # the layout jax.make_mesh picks, e.g. rings on a TPU torus
    grid = jax.make_mesh((n // fsdp, fsdp), MESH_AXES[1:], devices=devices).devices[None]
  elif hasattr(devices[0], "slice_index"):  # TPU slices: each slice laid out as one
    grid = mesh_utils.create_hybrid_device_mesh((1, n // fsdp, fsdp), (slices, 1, 1),
                                                devices, allow_split_physical_axes=True)
  else:  # no slice_index: consecutive processes' devices form a slice
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.stack([jax.make_mesh((n // fsdp, fsdp), MESH_AXES[1:],
                                   devices=ordered[i * n:(i + 1) * n]).devices
                     for i in range(slices)])
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


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
