r"""Plan a pod run before renting it: compile the train step for TPU slices, on any machine.

    python -m mae_jax.aot --config=configs/base.py:variant=L/16 --config.fsdp=4 \
        --config.batch_size=4096 --topology=v5p-128 [--num_slices=4] [--find_max_batch]

takes the command line of `mae_jax.main`, compiles the configured task's exact train
step (its optimizer, accumulation, shardings and donation) for the chips of one slice, or
of several joined by the data-center network (DCN), with libtpu's compile-only devices, and
prints per chip: parameter, optimizer-state, batch and temporary memory, the total against
the chip's HBM, the model FLOPs of a step and, across slices, the bytes each chip sends over
the DCN per step and their time at the hosts' DCN bandwidth (--dcn_gbps).
`--find_max_batch` bisects the largest per-chip batch that fits. No data is read.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from mae_jax import compile_cache, dcn, metrics, sharding, tasks
from mae_jax.main import fail, parse_config_flags
from mae_jax.topology import GiB, Slice, compile_devices, parse_slice
from mae_jax.trainer.step import abstract_state, check_batch, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-chip memory and DCN traffic of one compiled train step; byte counts are per chip."""
  slice_name: str
  num_chips: int  # of one slice
  fsdp: int
  batch_per_chip: int
  hbm_bytes: int
  params_bytes: int  # the arrays' own (unpadded) sizes, from their shardings
  opt_state_bytes: int
  batch_bytes: int
  memory: Any  # XLA's CompiledMemoryStats, None when XLA ran out of memory
  oom_message: str  # XLA's out-of-memory error, '' when it compiled
  flops_per_chip: float | None  # model FLOPs of one step (all accumulation micro-steps)
  peak_flops: float | None  # bf16 FLOP/s of one chip
  compile_seconds: float
  num_slices: int = 1
  dcn: tuple[dcn.Transfer, ...] = ()  # the step's cross-slice transfers of one chip
  chips_per_host: int = 4
  dcn_gbps: float | None = None  # DCN bandwidth per host, Gbit/s

  @property
  def dcn_bytes(self) -> float:
    """Bytes one chip sends over the DCN per step."""
    return sum(t.sent(self.num_slices) for t in self.dcn)

  @property
  def dcn_seconds(self) -> float | None:
    """The time of a step's DCN traffic: all chips of a host share its network."""
    if not self.dcn_gbps:
      return None
    return self.dcn_bytes * self.chips_per_host * 8 / (self.dcn_gbps * 1e9)

  @property
  def total_bytes(self) -> int | None:
    """Everything live during the step: inputs, outputs not donated into inputs,
    temporaries (activations, gradients, collectives' buffers) and the program itself."""
    return None if self.memory is None else live_bytes(self.memory)

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.total_bytes <= self.hbm_bytes


def live_bytes(m: Any) -> int:
  """Device bytes a compiled program needs, from its `memory_analysis()`: inputs, outputs
  not donated into inputs, temporaries and the program itself."""
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of one device's shards of a pytree of ShapeDtypeStructs."""
  return int(sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                 for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


class Planner:
  """Compiles the train step of `config`'s task for a slice at any per-chip batch.

  Everything that can be checked without compiling is checked here: the topology name,
  the slice count, the fsdp size, and that the parameters and optimizer state fit in HBM
  at all. `num_slices` copies of the slice form one data-parallel job (FSDP inside each).
  """

  def __init__(self, config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
               dcn_gbps: float | None = None):
    self.config = config
    self.slice: Slice = parse_slice(topology)
    self.num_slices = num_slices
    check_slices(config, num_slices)
    self.task = tasks.make_task(config)
    n = self.slice.num_chips
    if config.fsdp < 1 or n % config.fsdp:
      raise ValueError(f"--config.fsdp={config.fsdp} does not divide the {n} chips of "
                       f"{self.slice.name}" + (" (FSDP stays inside a slice)"
                                               if num_slices > 1 else ""))
    # The schedule's constants do not change the compiled program's buffers: any run length.
    self.schedule, self.tx = self.task.optimizer(1.0, warmup_steps=1, total_steps=2)
    self.abstract = abstract_state(self.task, self.tx)
    self.devices = compile_devices(self.slice, num_slices)
    self.mesh = sharding.make_mesh(config.fsdp, self.devices)
    # Compile-only devices belong to hosts as on the hardware: a host's chips share its NIC.
    self.chips_per_host = len(self.devices) // len({d.process_index for d in self.devices})
    per_chip = self.slice.chip.dcn_gbps
    self.dcn_gbps = dcn_gbps or (per_chip and per_chip * self.chips_per_host)
    self.state_shardings = sharding.tree_sharding(self.mesh, self.abstract)
    self.params_bytes = shard_bytes(self.abstract["params"], self.state_shardings["params"])
    self.opt_state_bytes = shard_bytes(self.abstract["opt_state"],
                                       self.state_shardings["opt_state"])
    state = self.params_bytes + self.opt_state_bytes
    if state > self.slice.chip.hbm_bytes:
      hint = (f"shard them over more chips with --config.fsdp (now {config.fsdp})"
              if config.fsdp < n else "use a larger slice or a smaller model")
      raise ValueError(
          f"the model cannot fit even at batch 1: its parameters and optimizer state alone "
          f"need {state / GiB:.2f} GiB per chip, more than the "
          f"{self.slice.chip.hbm_bytes / GiB:.0f} GiB of a {self.slice.generation} chip; {hint}")

  def compile(self, batch_per_chip: int) -> Report:
    """Compiles the step for `batch_per_chip` images per chip (a global batch of
    batch_per_chip x chips); XLA running out of HBM is a report that does not fit."""
    n, k = self.slice.num_chips * self.num_slices, self.config.grad_accum_steps
    check_batch(batch_per_chip * n, n, k)
    step = make_train_step(self.task, self.tx, self.schedule, self.mesh, self.abstract,
                           grad_accum_steps=k, seed=self.config.seed)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         self.abstract, self.state_shardings)
    batch_sharding = sharding.batch_sharding(self.mesh)
    batch = {key: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding)
             for key, a in self.task.batch_shapes(batch_per_chip * n).items()}
    start = time.perf_counter()
    memory, oom, transfers = None, "", []
    try:
      compiled = step.lower(state, batch).compile()
      seconds = time.perf_counter() - start
      memory, transfers = compiled.memory_analysis(), dcn.transfers(compiled.as_text())
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      seconds, oom = time.perf_counter() - start, str(e).strip().splitlines()[0]
    flops = self.task.flops_per_example()
    return Report(
        slice_name=self.slice.name, num_chips=self.slice.num_chips, fsdp=self.config.fsdp,
        batch_per_chip=batch_per_chip, hbm_bytes=self.slice.chip.hbm_bytes,
        params_bytes=self.params_bytes, opt_state_bytes=self.opt_state_bytes,
        batch_bytes=shard_bytes(batch, {key: batch_sharding for key in batch}),
        memory=memory, oom_message=oom,
        flops_per_chip=flops * batch_per_chip if flops else None,
        peak_flops=metrics.peak_flops(self.devices[0].device_kind),
        compile_seconds=seconds, num_slices=self.num_slices,
        dcn=tuple(transfers), chips_per_host=self.chips_per_host, dcn_gbps=self.dcn_gbps)


def find_max_batch(compile_fn: Callable[[int], Report], start: int, multiple: int,
                   resolution: int) -> tuple[Report | None, list[Report]]:
  """The largest per-chip batch (a multiple of `multiple`) whose step fits, to within
  `resolution` images (a multiple of `multiple`). Returns (its report, or None when even
  `multiple` does not fit; every report).

  Halving from `start` until a batch fits, then bisection of [largest fit, smallest
  failure), except that the next try is, when it falls inside that interval, the batch at
  which memory, extrapolated linearly from the largest fits, reaches HBM (at most double
  the largest fit), and once one `resolution` below a failed guess: a full-size compile
  takes minutes, and memory grows nearly linearly with the batch.
  """
  tried: dict[int, Report] = {}

  def fits(b: int) -> bool:
    if b not in tried:
      tried[b] = compile_fn(b)
      log.info("%d per chip: %s", b, summary(tried[b]))
    return tried[b].fits

  def down(b: float) -> int:
    return max(int(b) // multiple * multiple, multiple)

  def extrapolate() -> int:
    """Where memory reaches HBM, from the slope between the two largest fits (from the
    state and program, which do not grow with the batch, when there is one fit)."""
    fit = sorted((r for r in tried.values() if r.fits), key=lambda r: r.batch_per_chip)
    top = fit[-1]
    if len(fit) > 1:
      slope = (top.total_bytes - fit[-2].total_bytes) / (top.batch_per_chip -
                                                         fit[-2].batch_per_chip)
    else:
      fixed = (top.params_bytes + top.opt_state_bytes +
               top.memory.generated_code_size_in_bytes)
      slope = (top.total_bytes - fixed) / top.batch_per_chip
    b = top.batch_per_chip
    guess = b + (top.hbm_bytes - top.total_bytes) / slope if slope > 0 else 2 * b
    return down(min(guess, 2 * b))

  lo, hi = 0, None  # lo fits (0: none yet), hi does not (None: none yet)
  b = down(start)
  while not fits(b):
    hi = b
    if b == multiple:
      return None, sorted(tried.values(), key=lambda r: r.batch_per_chip)
    b = down(b // 2)
  lo, stepped_back = b, False
  while hi is None or hi - lo > resolution:
    guess = extrapolate()
    if hi is None:
      b = max(guess, lo + resolution)
    elif lo < guess < hi:
      b = guess
    elif not stepped_back:  # the guess overshot (XLA keeps some HBM): just below it, once
      b, stepped_back = hi - resolution, True
    else:
      b = down((lo + hi) // 2)
    if fits(b):
      lo = b
    else:
      hi = b
  return tried[lo], sorted(tried.values(), key=lambda r: r.batch_per_chip)


def check_slices(config: ml_collections.ConfigDict, num_slices: int) -> None:
  """A multi-slice job has one or more slices, and config.num_slices (0: as the devices
  say) cannot contradict their count."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: a job spans 1 or more slices")
  if config.num_slices not in (0, num_slices):
    raise ValueError(f"--config.num_slices={config.num_slices} contradicts "
                     f"--num_slices={num_slices}")


def check_request(config: ml_collections.ConfigDict, topology: str, find_max_batch: bool,
                  batch_resolution: int, num_slices: int = 1) -> None:
  """The command line's checks besides the Planner's: the slice's name and count, and that
  their chips divide the batch (or, for the search, that the resolution is a multiple of
  the accumulation steps)."""
  check_slices(config, num_slices)
  n, k = parse_slice(topology).num_chips * num_slices, config.grad_accum_steps
  if not find_max_batch:
    check_batch(config.batch_size, n, k)
  elif batch_resolution < 1 or batch_resolution % k:
    raise ValueError(f"--batch_resolution={batch_resolution} must be a positive multiple of "
                     f"grad_accum_steps ({k})")


def gib(n: float) -> str:
  """Bytes in GiB, or in MiB below a tenth of a GiB (tiny models)."""
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def summary(r: Report) -> str:
  """One line: total and fit, or XLA's out-of-memory message."""
  if r.memory is None:
    return f"does not fit ({r.oom_message}; compiled in {r.compile_seconds:.0f} s)"
  spare = r.hbm_bytes - r.total_bytes
  verdict = (f"fits, {gib(spare)} to spare" if r.fits else f"does not fit, over by "
             f"{gib(-spare)}")
  return (f"{gib(r.total_bytes)} of {gib(r.hbm_bytes)}: {verdict} (compiled in "
          f"{r.compile_seconds:.0f} s)")


def format_report(r: Report, model: str) -> str:
  chips = r.num_chips * r.num_slices
  layout = (f"{r.slice_name} ({r.num_chips} chips)" if r.num_slices == 1 else
            f"{r.num_slices} x {r.slice_name} ({chips} chips)")
  lines = [f"{model} on {layout}, fsdp {r.fsdp}, {r.batch_per_chip} images per chip "
           f"(global batch {r.batch_per_chip * chips})",
           "per chip:",
           f"  parameters              {gib(r.params_bytes)}",
           f"  optimizer state         {gib(r.opt_state_bytes)}",
           f"  batch                   {gib(r.batch_bytes)}"]
  m = r.memory
  if m is not None:
    padding = m.argument_size_in_bytes - r.params_bytes - r.opt_state_bytes - r.batch_bytes
    lines += [
        f"  other inputs, padding   {gib(padding)}  (step, model state, TPU tile padding)",
        f"  activations/temporaries {gib(m.temp_size_in_bytes)}",
        f"  outputs not donated     {gib(m.output_size_in_bytes - m.alias_size_in_bytes)}",
        f"  program                 {gib(m.generated_code_size_in_bytes)}"]
  lines.append(f"  total                   {summary(r)}")
  compute = r.flops_per_chip / r.peak_flops if r.flops_per_chip and r.peak_flops else None
  if r.flops_per_chip:
    ideal = (f", at least {compute * 1e3:.3g} ms at the chip's {r.peak_flops / 1e12:.0f} "
             f"TFLOP/s peak" if compute else "")
    unit, scale = ("TFLOP", 1e12) if r.flops_per_chip >= 1e12 else ("GFLOP", 1e9)
    lines.append(f"  model FLOPs per step    {r.flops_per_chip / scale:.3g} {unit}{ideal}")
  if r.num_slices > 1 and r.memory is not None:
    lines.append(f"  sent over DCN per step  {format_dcn(r, compute)}")
  return "\n".join(lines)


def format_dcn(r: Report, compute_seconds: float | None) -> str:
  """Bytes one chip sends across slices per step, the kinds of collective, and their
  time at the hosts' DCN bandwidth beside the compute time at peak."""
  kinds = sorted({t.kind.lower().replace("_", "-") for t in r.dcn})
  text = f"{gib(r.dcn_bytes)} ({', '.join(kinds) or 'nothing'})"
  if any(t.count is None for t in r.dcn):
    text = "at least " + text + " (a loop's trip count unknown)"
  if r.dcn_seconds is None:
    return text + "; give --dcn_gbps (per host) for its time"
  text += (f", {r.dcn_seconds * 1e3:.3g} ms at {r.dcn_gbps:g} Gbit/s per host of "
           f"{r.chips_per_host} chips")
  if compute_seconds:
    ratio = r.dcn_seconds / compute_seconds
    bound = "DCN-bound" if ratio > 1 else "compute-bound"
    text += f": {ratio:.3g}x" if ratio < 100 else f": {ratio:.0f}x"
    text += f" the compute at peak, {bound}"
  return text


def model_name(task: tasks.Task) -> str:
  m = task.model_dict()
  shown = ("width", "depth", "patch_size", "image_size", "dtype")
  return f"{task.name} ({', '.join(f'{k} {m[k]}' for k in shown if k in m)})"


def define_flags() -> None:
  """The command line's flags; defined only when this module runs as the program (see
  mae_jax.main.define_flags)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections), as "
                                  "for mae_jax.main.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: an accelerator type (v4-32, v5p-128, "
                      "v5litepod-16, v6e-8) or a topology shape (v5e:4x4, v5p:2x2x1).")
  flags.DEFINE_integer("num_slices", None, "How many such slices, joined by the data-center "
                       "network (default: config.num_slices, or 1).")
  flags.DEFINE_float("dcn_gbps", None, "DCN bandwidth per host in Gbit/s, for the time of "
                     "the cross-slice traffic (default: from the Cloud TPU pages: 50 per v5p "
                     "chip, 25 per v5e chip, 100 per v6e chip, times the chips per host).")
  flags.DEFINE_bool("find_max_batch", False, "Bisect the largest per-chip batch that fits, "
                    "starting from config.batch_size / chips.")
  flags.DEFINE_integer("batch_resolution", 8, "--find_max_batch stops when the largest batch "
                       "is known to within this many images per chip.")
  flags.DEFINE_string("workdir", None, "Ignored: accepted so that a mae_jax.main command line "
                      "plans its run by adding --topology. Nothing is read or written.")


FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
  """mae_jax.main's flag parsing (help on stdout, mistakes as one line), then aot's required
  flags."""
  argv = parse_config_flags(argv)
  for name, example in (("config", "configs/base.py"), ("topology", "v5p-128")):
    if FLAGS[name].value is None:
      fail(f"--{name} is required, e.g. --{name}={example}")
  return argv


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mae_jax").setLevel(logging.INFO)
  # This machine's accelerators are not used: the step is compiled for the slice's chips.
  jax.config.update("jax_platforms", "cpu")
  config = FLAGS.config
  # Off: libtpu's compile-only client writes cache entries but cannot load them (JAX 0.10.2:
  # "PjRtCompiler must be constructed with a Client"), so each would be a warning and a compile.
  compile_cache.enable("")
  num_slices = FLAGS.num_slices if FLAGS.num_slices is not None else config.num_slices or 1
  try:
    check_request(config, FLAGS.topology, FLAGS.find_max_batch, FLAGS.batch_resolution,
                  num_slices)
    planner = Planner(config, FLAGS.topology, num_slices, FLAGS.dcn_gbps)
  except (ValueError, ImportError) as e:  # bad input; libtpu missing
    fail(str(e))
  n, k = planner.slice.num_chips * num_slices, config.grad_accum_steps
  name = model_name(planner.task)
  if not FLAGS.find_max_batch:
    print(format_report(planner.compile(config.batch_size // n), name))
    return
  best, tried = find_max_batch(planner.compile, config.batch_size // n, k,
                               FLAGS.batch_resolution)
  if best is None:
    fail(f"the model cannot fit even at batch {k} per chip on {planner.slice.name}: "
         f"{summary(tried[0])}")
  print(format_report(best, name))
  print(f"largest per-chip batch that fits: {best.batch_per_chip} (to within "
        f"{FLAGS.batch_resolution}; tried {', '.join(str(r.batch_per_chip) for r in tried)})")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
