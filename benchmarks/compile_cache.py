"""Time to first step with a cold and a warm persistent compilation cache, as a restart sees it.

  python benchmarks/compile_cache.py [--rounds 2] [--models demo,B/16]

Each measurement is a fresh `python -m mae_jax.main` process on this machine's CPU: the time
from its start to its start-up line for the train step (`compilation cache: hit|miss ...`,
logged once the first step's call has returned, i.e. compiled or loaded and dispatched),
after which the process is killed. Cold: an empty cache directory; warm: one that a
previous, untimed run of the same command filled. The models: configs/demo.py as it is, and
configs/base.py (ViT-B/16, bfloat16, the paper's decoder) on the demo photographs at batch
8. Runs rotate through (model, cold|warm) so that load drift hits all alike; prints the
medians and the cold / warm ratio.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "demo": ["--config=configs/demo.py"],
    "B/16": ["--config=configs/base.py", "--config.input.dataset=demo",
             "--config.input.eval_split=val", "--config.input.worker_count=0",
             "--config.batch_size=8", "--config.total_steps=100", "--config.warmup_steps=1"],
}
LINE = re.compile(r"compilation cache: (hit|miss|on|off)[:;] the train step .*?in ([\d.]+) s")


def first_step(model: str, cache_dir: str, workdir: str) -> tuple[float, str, float]:
  """(seconds from process start to the train step's start-up line, hit|miss, the seconds
  that line gives for the step's compile or load)."""
  command = [sys.executable, "-m", "mae_jax.main", *MODELS[model], f"--workdir={workdir}",
             f"--config.compilation_cache_dir={cache_dir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    for line in child.stderr:
      found = LINE.search(line)
      if found:
        return time.perf_counter() - start, found.group(1), float(found.group(2))
  finally:
    child.kill()
    child.wait()
  raise RuntimeError(f"{' '.join(command)} ended without its compilation cache line")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--models", default="demo,B/16")
  args = parser.parse_args()
  models = args.models.split(",")
  root = tempfile.mkdtemp(prefix="compile_cache_bench_")
  count = iter(range(10**6))
  new_dir = lambda: os.path.join(root, str(next(count)))
  warm = {m: new_dir() for m in models}
  for m in models:  # fill the warm caches (and build the demo photographs), untimed
    first_step(m, warm[m], new_dir())
  rows = [(m, kind) for m in models for kind in ("cold", "warm")]
  results = {row: [] for row in rows}
  for r in range(args.rounds):
    for m, kind in rows[r % len(rows):] + rows[:r % len(rows)]:
      cache = warm[m] if kind == "warm" else new_dir()
      results[(m, kind)].append(first_step(m, cache, new_dir()))
      print(f"  round {r}: {m} {kind}: {results[(m, kind)][-1]}", flush=True)
  print(f"time to first step, {os.cpu_count()} cpus, median of {args.rounds} "
        "(the train step's own compile or load in brackets):")
  for m in models:
    med = {kind: (np.median([t for t, _, _ in results[(m, kind)]]),
                  np.median([s for _, _, s in results[(m, kind)]])) for kind in ("cold", "warm")}
    verdicts = {kind: {v for _, v, _ in results[(m, kind)]} for kind in ("cold", "warm")}
    print(f"  {m:5s} cold {med['cold'][0]:6.1f} s ({med['cold'][1]:.1f} s, "
          f"{'/'.join(sorted(verdicts['cold']))})  warm {med['warm'][0]:6.1f} s "
          f"({med['warm'][1]:.1f} s, {'/'.join(sorted(verdicts['warm']))})  "
          f"cold / warm {med['cold'][0] / med['warm'][0]:.2f}x "
          f"(step alone {med['cold'][1] / med['warm'][1]:.1f}x)")


if __name__ == "__main__":
  main()
