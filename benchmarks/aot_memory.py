"""Per-chip memory of pretraining on TPU slices, compiled ahead of time (needs libtpu).

    nice -n 10 python benchmarks/aot_memory.py 2>&1 | tee aot_memory.log

Prints the markdown rows of BENCHMARKS.md's table: ViT-B/16, L/16 and H/14 with the paper's
recipe (configs/base.py, bfloat16) at 128 images per chip on v5e and v5p slices, fsdp 1 and
4; then the largest per-chip batch of B/16 on v5e. Each full-size compile takes minutes.
"""
from __future__ import annotations

import argparse
import datetime
import logging

import jax

from configs import base
from mae_jax import aot
from mae_jax.topology import GiB, parse_slice


def planner(variant: str, topology: str, fsdp: int, batch_per_chip: int) -> aot.Planner:
  config = base.get_config(f"variant={variant}")
  config.fsdp = fsdp
  num_chips = parse_slice(topology).num_chips
  config.batch_size = batch_per_chip * num_chips
  return aot.Planner(config, topology)


def row(variant: str, r: aot.Report) -> str:
  m = r.memory
  cells = [variant, r.slice_name, str(r.fsdp), str(r.batch_per_chip),
           f"{r.params_bytes / GiB:.2f}", f"{r.opt_state_bytes / GiB:.2f}"]
  if m is None:
    cells += ["", "", f"does not fit: {r.oom_message}"]
  else:
    spare = (r.hbm_bytes - r.total_bytes) / GiB
    cells += [f"{m.temp_size_in_bytes / GiB:.2f}", f"{r.total_bytes / GiB:.2f}",
              f"{'fits' if r.fits else 'does not fit'} ({spare:+.2f})"]
  cells += [f"{r.flops_per_chip / 1e12:.1f}", f"{r.compile_seconds:.0f}"]
  return "| " + " | ".join(cells) + " |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variants", default="B/16,L/16,H/14")
  parser.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1")
  parser.add_argument("--fsdp", default="1,4")
  parser.add_argument("--batch_per_chip", type=int, default=128)
  parser.add_argument("--max_batch_topology", default="v5e:2x2")
  parser.add_argument("--max_batch_start", type=int, default=128)
  parser.add_argument("--batch_resolution", type=int, default=16)
  args = parser.parse_args()
  # As `python -m mae_jax.aot`: this machine's accelerators are not used (nor traced for).
  jax.config.update("jax_platforms", "cpu")
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("mae_jax").setLevel(logging.INFO)
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
  print("| model | slice | fsdp | images/chip | params GiB | optimizer GiB | temporaries GiB | "
        "total GiB | vs HBM (GiB spare) | model TFLOP/step/chip | compile s |", flush=True)
  print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  reports = {}
  for variant in filter(None, args.variants.split(",")):
    for topology in args.topologies.split(","):
      for fsdp in map(int, args.fsdp.split(",")):
        r = planner(variant, topology, fsdp, args.batch_per_chip).compile(args.batch_per_chip)
        reports[variant, r.slice_name, fsdp, r.batch_per_chip] = r
        print(row(variant, r), flush=True)

  if args.max_batch_topology:
    p = planner("B/16", args.max_batch_topology, 1, args.max_batch_start)
    def compile_fn(b: int) -> aot.Report:  # reuses the table's compile at the start batch
      key = ("B/16", p.slice.name, 1, b)
      return reports[key] if key in reports else p.compile(b)
    best, tried = aot.find_max_batch(compile_fn, args.max_batch_start, 1,
                                     args.batch_resolution)
    for r in tried:
      if ("B/16", r.slice_name, 1, r.batch_per_chip) not in reports:
        print(row("B/16", r), flush=True)
    print(f"largest per-chip batch of B/16 on {p.slice.name}: "
          f"{best.batch_per_chip if best else None} (to within {args.batch_resolution})",
          flush=True)


if __name__ == "__main__":
  main()
