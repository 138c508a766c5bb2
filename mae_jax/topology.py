"""TPU slices by the names users rent (`v5p-128`, `v5litepod-16`) or by shape (`v5e:4x4`).

A slice resolves to a chip generation and a torus shape; `compile_devices` asks libtpu for
compile-only devices of one or several such slices, so a step can be compiled for a pod (or
a multi-slice job) on any machine.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: per-chip HBM and how libtpu and the accelerator names see it."""
  hbm_bytes: int
  torus_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p)
  cores_per_chip: int  # the number in an accelerator name counts TensorCores: v4-8 = 4 chips
  chip_config: str  # libtpu's chip_config_name: 'megacore' when two cores act as one device
  dcn_gbps: float | None  # the hosts' data-center network bandwidth per chip, Gbit/s


# HBM per chip and DCN bandwidth from the Cloud TPU system architecture pages: v5p 50 Gbit/s
# per chip; v5e 2 x 100 and v6e 4 x 200 Gbit/s NICs per host of 8 chips; v4: not stated.
CHIPS = {
    "v4": Chip(32 * GiB, torus_dims=3, cores_per_chip=2, chip_config="megacore",
               dcn_gbps=None),
    "v5e": Chip(16 * GiB, torus_dims=2, cores_per_chip=1, chip_config="default", dcn_gbps=25),
    "v5p": Chip(95 * GiB, torus_dims=3, cores_per_chip=2, chip_config="megacore",
                dcn_gbps=50),
    "v6e": Chip(32 * GiB, torus_dims=2, cores_per_chip=1, chip_config="default",
                dcn_gbps=100),
}
# Other spellings of the generations: Cloud's accelerator types and libtpu's names.
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  generation: str  # a key of CHIPS
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    """libtpu's topology name, e.g. 'v5e:4x4'."""
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"


def _shape_of(chips: int, dims: int) -> tuple[int, ...] | None:
  """The torus shape Cloud TPU gives a slice of `chips` chips (a power of 2), or None.

  2D (v5e, v6e): 1x1, 2x2, 2x4, 4x4, 4x8, ...; 3D (v4, v5p): 2x2x1, 2x2x2, 2x2x4, 2x4x4,
  4x4x4, ...: each doubling doubles the last of the smallest axes.
  """
  if chips < 1 or chips & (chips - 1):
    return None
  if dims == 2:
    if chips == 2:
      return None
    side = math.isqrt(chips)
    if side * side == chips:
      return (side, side)
    side = math.isqrt(chips // 2)
    return (side, 2 * side)
  if chips < 4:
    return None
  shape = [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return tuple(shape)


def parse_slice(name: str) -> Slice:
  """'v5p-128' / 'v5litepod-16' / 'v4-32' / 'v6e-8' (accelerator types, counting TensorCores
  for v4 and v5p) or 'v5e:4x4' / 'v5p:2x2x1' (libtpu topology shapes) -> Slice."""
  known = (f"accelerator types such as v4-32, v5p-128, v5litepod-16, v6e-8, or shapes such as "
           f"v5e:4x4, v5p:2x2x1 (generations: {', '.join(CHIPS)})")
  m = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
  generation = m and ALIASES.get(m.group(1), m.group(1))
  if not m or generation not in CHIPS:
    raise ValueError(f"unknown TPU topology {name!r}: expected {known}")
  chip = CHIPS[generation]
  if m.group(2):
    cores = int(m.group(2))
    shape = (_shape_of(cores // chip.cores_per_chip, chip.torus_dims)
             if cores % chip.cores_per_chip == 0 else None)
    if shape is None:
      raise ValueError(f"unknown TPU topology {name!r}: {generation} slices come in "
                       f"{'TensorCore' if chip.cores_per_chip > 1 else 'chip'} counts such as "
                       f"{', '.join(f'{generation}-{n}' for n in (8, 16, 32, 64, 128))}; "
                       f"give other shapes as {generation}:" +
                       "x".join(["2"] * chip.torus_dims))
  else:
    shape = tuple(int(s) for s in m.group(3).split("x"))
    if len(shape) != chip.torus_dims or min(shape) < 1:
      raise ValueError(f"TPU topology {name!r}: {generation} shapes have {chip.torus_dims} "
                       f"positive axes, e.g. {generation}:" + "x".join(["2"] * chip.torus_dims))
  return Slice(generation, shape)


def compile_devices(tpu_slice: Slice, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` copies of the slice, one per chip, each with its
  `slice_index` (needs libtpu, not the hardware)."""
  try:
    import libtpu  # noqa: F401  # pylint: disable=unused-import,import-outside-toplevel
  except ImportError as e:
    raise ImportError("compiling for a TPU slice needs libtpu: pip install -e '.[tpu]'"
                      ) from e
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # Compile-only devices open no chip, so libtpu's one-process-per-host lock need not hold:
  # several plans (and the tests) may compile at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name=tpu_slice.name, num_slices=num_slices,
      chip_config_name=tpu_slice.chip.chip_config).devices
  if len(devices) != tpu_slice.num_chips * num_slices:
    raise RuntimeError(f"libtpu made {len(devices)} devices for {num_slices} x "
                       f"{tpu_slice.name}, expected one per chip "
                       f"({tpu_slice.num_chips * num_slices})")
  return devices
