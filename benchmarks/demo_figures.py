"""Do the README's demo figures still hold? Reruns what it quotes and reports any drift.

  python benchmarks/demo_figures.py --workdir=/tmp/mae_demo_figures

Runs the quick start's command (`python -m mae_jax.main --config=configs/demo.py`) in WORKDIR
unless WORKDIR already holds its finished run (about 5 minutes alone on 2 cores), then
compares with what README.md and BENCHMARKS.md quote: the logged training losses at steps
100, 1000, 2000 and 3000, `benchmarks/demo_loss.py`'s held-out table, and the step-3000 grid
against docs/demo_reconstructions.png. The numbers quoted are read from the two files, so
the check follows their edits. Exit code 1 on any drift; it prints what to update.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from PIL import Image

import demo_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3000  # configs/demo.py's length
FIGURE = os.path.join(ROOT, "docs", "demo_reconstructions.png")
# The README's table rows, by their first cell: the quoted (loss, colour, structure) columns.
TABLE_ROWS = {"untrained (step 0)": "step 0", "predict each hidden patch's mean": "patch mean",
              "demo, step 3000": "trained"}


def quoted_logged_losses(readme: str) -> dict[int, str]:
  """{last step of the 100: loss} from 'The logged training loss ... 0.740 (steps 1-100), ...'."""
  start = readme.index("The logged training loss")
  text = readme[start:start + 400]
  return {int(end): loss for loss, end in re.findall(r"(\d\.\d+)\s+\((?:steps )?\d+-(\d+)\)",
                                                     text)}


def quoted_table(readme: str) -> dict[str, list[str]]:
  """{'step 0' | 'patch mean' | 'trained': [loss, colour, structure, explained]} as quoted."""
  out = {}
  for line in readme.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    for prefix, name in TABLE_ROWS.items():
      if cells[0].startswith(prefix):
        out[name] = cells[1:5]
  return out


def quoted_benchmarks_row(benchmarks: str) -> list[str]:
  """BENCHMARKS.md's current demo row: untrained, patch mean, trained, colour, structure,
  explained."""
  for line in benchmarks.splitlines():
    if line.startswith("| current ("):
      return [c.strip() for c in line.strip().strip("|").split("|")][2:8]
  raise ValueError("BENCHMARKS.md has no '| current (' row in the demo loss table")


def logged_losses(workdir: str) -> dict[int, float]:
  """{step: logged loss} from metrics.jsonl (a re-run step's later row wins)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def same(quoted: str, value: float) -> bool:
  """Whether `value` rounds to `quoted` ('0.421', or '10.1%' for a fraction)."""
  if quoted.endswith("%"):
    decimals = len(quoted[:-1].partition(".")[2])
    return f"{100 * value:.{decimals}f}%" == quoted
  return f"{value:.{len(quoted.partition('.')[2])}f}" == quoted


def grid_drift(png: str) -> str | None:
  """None when the run's step-3000 grid equals docs/demo_reconstructions.png, else how not."""
  now, doc = np.asarray(Image.open(png)), np.asarray(Image.open(FIGURE))
  if now.shape != doc.shape:
    return f"size {now.shape[1]}x{now.shape[0]} != {doc.shape[1]}x{doc.shape[0]}"
  differ = np.any(now != doc, axis=-1)  # [H, W]
  if not differ.any():
    return None
  width = (now.shape[1] - 2) // 5  # 5 columns, 2 px apart
  columns = sorted({int(x) // width + 1 for x in np.nonzero(differ)[1]})
  return f"{differ.mean():.1%} of the pixels differ (columns {columns} of 5)"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the demo run (made when missing)")
  parser.add_argument("--draws", type=int, default=16, help="demo_loss.py's mask draws")
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS))):
    command = [sys.executable, "-m", "mae_jax.main", "--config=configs/demo.py",
               f"--workdir={workdir}"]
    print("running", " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"the demo took {time.time() - start:.0f} s wall", flush=True)
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
    benchmarks = f.read()

  checks = []  # (figure, quoted, now)
  logged = logged_losses(workdir)
  for step, quoted in quoted_logged_losses(readme).items():
    checks.append((f"README: logged loss, steps {step - 99}-{step}", quoted, logged.get(step)))
  rows = demo_loss.measure(workdir, args.draws)["held-out images"]
  flat = rows["patch mean"][2]
  measured = {name: [*rows[name], 1 - rows[name][2] / flat] for name in rows}
  parts = ("loss", "colour part", "structure part", "structure explained")
  for name, quoted in quoted_table(readme).items():
    for part, q, value in zip(parts, quoted, measured[name]):
      if q != "-":
        checks.append((f"README: demo_loss.py, {name}, {part}", q, value))
  bench_values = [measured["step 0"][0], measured["patch mean"][0], *measured["trained"]]
  bench_names = ("untrained", "patch mean", "trained", "colour part", "structure part",
                 "structure explained")
  for part, q, value in zip(bench_names, quoted_benchmarks_row(benchmarks), bench_values):
    checks.append((f"BENCHMARKS.md: demo row, {part}", q, value))

  drift = 0
  for figure, quoted, value in checks:
    ok = value is not None and same(quoted, value)
    drift += not ok
    now = "missing" if value is None else (f"{100 * value:.1f}%" if quoted.endswith("%")
                                           else f"{value:.4f}")
    print(f"{'ok   ' if ok else 'DRIFT'} {figure}: quoted {quoted}, now {now}")
  png = os.path.join(workdir, "reconstructions", f"step_{STEPS:08d}.png")
  grid = grid_drift(png)
  print(f"{'ok   ' if grid is None else 'DRIFT'} docs/demo_reconstructions.png vs the run's "
        f"step-{STEPS} grid{': ' + grid if grid else ''}")
  drift += grid is not None
  if drift:
    print(f"\n{drift} figure(s) drifted. Update README.md / BENCHMARKS.md with the values "
          f"above; regenerate the figure with\n  cp {png} {FIGURE}")
  return 1 if drift else 0


if __name__ == "__main__":
  sys.exit(main())
