"""Where a traced train step's time goes, as text: top operations and the step's split.

  python -m mae_jax.trace_report WORKDIR [--top 15] [--device 0]

Reads the newest `perfetto_trace.json.gz` under WORKDIR/tensorboard/plugins/profile/ (the
trace `config.profile` writes, see mae_jax/profiling.py; a run directory or the file itself
works too) and prints, for one device:
  * the step: the program that took the most device time (the train step), how many times it
    ran in the trace, and the time per step (the span from its first operation to the last
    operation of the trace, over the steps);
  * the split of that time into matmuls, attention (fused attention kernels: cuDNN's, flash),
    elementwise/fusions, collectives, other programs and host waits, which sum to the step.
    Where operations overlap (CPU threads, GPU streams), each moment counts once, for the
    first of those categories running; so 'collectives' is their exposed time, and 'host
    waits' the moments when the device ran nothing (dispatch, input, Python);
  * the top operations by device time per step (time inside nested operations counted once,
    for the innermost).
Only the Python standard library: the JSON is Chrome's trace event format.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import sys

from mae_jax import storage

TRACE_NAME = "perfetto_trace.json.gz"
# In the order of precedence for moments when several run at once.
CATEGORIES = ("attention", "matmuls", "elementwise/fusions", "collectives", "other programs")
HOST_WAITS = "host waits"
PATTERNS = (  # matched against an operation's names (HLO op, kernels, HLO text), lower case
    ("attention", re.compile(r"fmha|sdpa|flash|fused_attention|dot_product_attention|"
                             r"cudnn.*(attn|attention)")),
    ("collectives", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|"
                               r"collective-permute|all_reduce|all_gather|reduce_scatter|"
                               r"nccl|send|recv|collective")),
    ("matmuls", re.compile(r"\bdot\b|dot[._]|gemm|matmul|cublas|cutlass|nvjet|xmma|wgmma|"
                           r"hmma|convolution|conv[._]|ynn_fusion|onednn")),
)


@dataclasses.dataclass
class Op:
  name: str  # the HLO op, e.g. 'fusion.12'
  module: str  # the HLO module, e.g. 'jit_step'
  start: float  # microseconds
  end: float
  text: str  # everything known about it, lower case (names, kernels, HLO text)
  self_time: float = 0.0  # its time outside operations nested in it


@dataclasses.dataclass
class Report:
  path: str
  device: str
  module: str
  steps: int
  step_us: float  # per step
  split_us: dict[str, float]  # per step; sums to step_us
  top: list[tuple[str, str, float, int]]  # (op, category, us per step, calls per step)


def find_trace(path: str) -> str:
  """The newest trace file at or under `path` (a file, a workdir, a profile directory)."""
  p = storage.path(path)
  if p.is_file():
    return str(p)
  for pattern in ("tensorboard/plugins/profile/*/", "plugins/profile/*/", "*/", ""):
    found = sorted(p.glob(pattern + TRACE_NAME))  # run directories are named by date
    if found:
      break
  if not found:
    raise FileNotFoundError(f"no {TRACE_NAME} under {path}: set config.profile.steps to "
                            "trace steps (mae_jax/profiling.py)")
  return str(found[-1])


def load_ops(trace: dict, device: int) -> tuple[str, list[Op]]:
  """The device's operations, with the device's name.

  Devices are the trace's /device:* processes (GPU, TPU), or on the CPU the host process's
  events split by their `device_ordinal`; `device` indexes them in sorted order. An
  operation is an event with an `hlo_op` argument, or any event on a device's 'XLA Ops'
  line; where a device has that line, only it is read (its kernels are also on the stream
  lines, whose kernel names are added to their op's text). An op without an `hlo_module`
  belongs to the 'XLA Modules' event around it.
  """
  events = [e for e in trace["traceEvents"] if e.get("ph") in ("X", "M")]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e["ph"] == "M" and e.get("name") == "process_name"}
  lines = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
           if e["ph"] == "M" and e.get("name") == "thread_name"}
  line = lambda e: lines.get((e["pid"], e.get("tid")))
  device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
  by_device = collections.defaultdict(list)
  modules = collections.defaultdict(list)  # pid: 'XLA Modules' events
  for e in events:
    args = e.get("args") or {}
    if e["ph"] != "X":
      continue
    if line(e) == "XLA Modules":
      modules[e["pid"]].append(e)
    if "hlo_op" not in args and not (e["pid"] in device_pids and line(e) == "XLA Ops"):
      continue
    if device_pids:
      if e["pid"] in device_pids:
        by_device[processes[e["pid"]]].append(e)
    else:
      by_device[f"{processes.get(e['pid'], e['pid'])} device "
                f"{args.get('device_ordinal', 0)}"].append(e)
  if not by_device:
    raise ValueError("the trace has no device operations (events with an hlo_op)")
  names = sorted(by_device, key=lambda k: [int(t) if t.isdigit() else t
                                           for t in re.split(r"(\d+)", k)])
  if not 0 <= device < len(names):
    raise ValueError(f"--device {device}: the trace has {len(names)} devices ({names})")
  chosen = by_device[names[device]]
  ops_line = [e for e in chosen if line(e) == "XLA Ops"]
  op_name = lambda e: (e.get("args") or {}).get("hlo_op", e["name"])
  kernels = collections.defaultdict(set)
  for e in chosen:
    if e["name"] != op_name(e):
      kernels[op_name(e)].add(e["name"])
  ops = []
  for e in ops_line or chosen:
    args = e.get("args") or {}
    module = args.get("hlo_module") or next(
        (m["name"] for m in modules[e["pid"]]
         if m["ts"] <= e["ts"] <= m["ts"] + m.get("dur", 0.0)), "")
    text = " ".join([op_name(e), e["name"], str(args.get("hlo_category", "")),
                     *hlo_kind(str(args.get("long_name", ""))), *kernels[op_name(e)]])
    ops.append(Op(op_name(e), str(module), e["ts"], e["ts"] + e.get("dur", 0.0),
                  text.lower()))
  return names[device], ops


def hlo_kind(long_name: str) -> list[str]:
  """From an op's HLO text, its opcode and custom-call target ('custom-call',
  '__cudnn$fmhaSoftmax'), not its operands' names (a fusion reading a dot is no matmul)."""
  opcode = re.search(r"=.*?\s([\w-]+)\(", long_name)
  target = re.search(r'custom_call_target="([^"]+)"', long_name)
  return [m.group(1) for m in (opcode, target) if m]


def category(op: Op, module: str) -> str:
  if op.module != module:
    return "other programs"
  for name, pattern in PATTERNS:
    if pattern.search(op.text):
      return name
  return "elementwise/fusions"


def count_steps(trace: dict, module: str) -> int:
  """How many times the step's program ran: its distinct `run_id`s, else its events on an
  'XLA Modules' line (named after the program), else 1."""
  events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
  runs = {e["args"]["run_id"] for e in events
          if (e.get("args") or {}).get("hlo_module") == module and "run_id" in e["args"]}
  if runs:
    return len(runs)
  lines = {(e["pid"], e.get("tid")) for e in trace["traceEvents"]
           if e.get("ph") == "M" and e.get("name") == "thread_name"
           and e["args"]["name"] == "XLA Modules"}
  return max(1, len({e["ts"] for e in events if (e["pid"], e.get("tid")) in lines
                     and e["name"].startswith(module)}))


def set_self_times(ops: list[Op]) -> None:
  """Each op's time minus the ops nested inside it (same thread order: sorted by start)."""
  stack: list[Op] = []
  for op in sorted(ops, key=lambda o: (o.start, -o.end)):
    op.self_time = op.end - op.start
    while stack and stack[-1].end <= op.start:
      stack.pop()
    if stack and op.end <= stack[-1].end:
      stack[-1].self_time -= op.end - op.start
    stack.append(op)


def split(ops: list[Op], module: str, start: float, end: float) -> dict[str, float]:
  """Microseconds of [start, end] per category (the first running, in CATEGORIES order),
  and host waits where none runs."""
  rank = {c: i for i, c in enumerate(CATEGORIES)}
  points = []
  for op in ops:
    r = rank[category(op, module)]
    points += [(max(op.start, start), 1, r), (min(op.end, end), -1, r)]
  points.sort()
  running = [0] * len(CATEGORIES)
  out = dict.fromkeys(CATEGORIES + (HOST_WAITS,), 0.0)
  last = start
  for t, delta, r in points:
    if t > last:
      active = next((i for i, n in enumerate(running) if n > 0), None)
      out[HOST_WAITS if active is None else CATEGORIES[active]] += t - last
      last = t
    running[r] += delta
  out[HOST_WAITS] += max(0.0, end - last)
  return out


def analyse(path: str, device: int = 0, top: int = 15) -> Report:
  trace_path = find_trace(path)
  with storage.path(trace_path).open("rb") as f:
    trace = json.loads(gzip.decompress(f.read()))
  name, ops = load_ops(trace, device)
  busy = collections.Counter()
  for op in ops:
    busy[op.module] += op.end - op.start
  module = busy.most_common(1)[0][0]
  steps = count_steps(trace, module)
  start = min(op.start for op in ops if op.module == module)
  end = max(op.end for op in ops)
  set_self_times(ops)
  per_op = collections.defaultdict(lambda: [0.0, 0])
  for op in ops:
    per_op[(op.name, category(op, module))][0] += op.self_time
    per_op[(op.name, category(op, module))][1] += 1
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
  return Report(
      path=trace_path, device=name, module=module, steps=steps, step_us=(end - start) / steps,
      split_us={k: v / steps for k, v in split(ops, module, start, end).items()},
      top=[(op, cat, t / steps, round(n / steps)) for (op, cat), (t, n) in ranked])


def format_report(r: Report) -> str:
  lines = [f"trace: {r.path}",
           f"device {r.device}, program {r.module}: {r.steps} steps, "
           f"{r.step_us / 1e3:.2f} ms per step",
           "the step's time (each moment once, for the first category running):"]
  for name, us in r.split_us.items():
    lines.append(f"  {name:22s} {us / 1e3:9.2f} ms  {us / r.step_us:6.1%}")
  lines.append(f"top {len(r.top)} operations by device time per step (nested time counted "
               "once):")
  for op, cat, us, calls in r.top:
    lines.append(f"  {op[:48]:48s} {cat:20s} {us / 1e3:9.3f} ms  {us / r.step_us:6.1%}"
                 f"  x{calls}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("path", help="a workdir, a profile directory or a perfetto_trace.json.gz")
  parser.add_argument("--device", type=int, default=0, help="which device (sorted order)")
  parser.add_argument("--top", type=int, default=15, help="how many operations to list")
  args = parser.parse_args(argv)
  try:
    print(format_report(analyse(args.path, args.device, args.top)))
  except (FileNotFoundError, ValueError) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)


if __name__ == "__main__":
  main()
