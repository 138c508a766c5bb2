"""What a compiled multi-slice TPU program sends over the data-center network (DCN).

Compiled for several slices, XLA splits each collective that crosses slices into its parts
inside a slice (over ICI) and a host transfer to libtpu's Megascale runtime, which runs the
cross-slice part over the DCN: in the program's HLO text, a `send` marked
`_xla_host_transfer_handler_name="xla_megascale_runtime"` whose operand is this chip's share
(e.g. its quarter of the gradients, reduce-scattered inside a 4-chip slice first) and whose
`_xla_megascale_transfer_type` names the collective. A send inside a loop body runs once per
iteration (gradient accumulation's loop, for one).
"""
from __future__ import annotations

import dataclasses
import math
import re

# One HLO computation: its header line ("%name (params) -> shape {", or "ENTRY %name ...")
# up to the closing brace at the start of a line.
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*?\{\n(.*?)^\}", re.M | re.S)
_SEND = re.compile(r"= \((\w+)\[([\d,]*)\][^ ]*, u32\[\], token\[\]\) send\(.*?"
                   r"xla_megascale_runtime.*?_xla_megascale_transfer_type=\"(\w+)\"")
_WHILE = re.compile(r"while\(.*condition=%([\w.\-]+), body=%([\w.\-]+)(.*)")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation|"
                     r"branch_computations)=\{?((?:%[\w.\-]+(?:, )?)+)")
_TRIP_COUNT = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_LOOP_BOUND = re.compile(r"ROOT .*compare\(.*direction=LT")
_CONSTANT = re.compile(r"s32\[\][^ ]* constant\((\d+)\)")


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One cross-slice collective of one chip: its kind (ALL_REDUCE, ALL_GATHER, ...), the
  bytes this chip hands to it (`payload`), and how often it runs per program execution
  (None when a loop's trip count could not be read: counted once)."""
  kind: str
  payload: int
  count: int | None

  def sent(self, num_slices: int) -> float:
    """Bytes this chip sends over the DCN per run, for ring algorithms over the slices: an
    all-reduce sends its payload 2(n-1)/n times, an all-gather its shard to n-1 others, a
    reduce-scatter or all-to-all (n-1)/n of it; any other transfer its payload once."""
    n = num_slices
    factor = {"ALL_REDUCE": 2 * (n - 1) / n, "ALL_GATHER": n - 1,
              "REDUCE_SCATTER": (n - 1) / n, "ALL_TO_ALL": (n - 1) / n}.get(self.kind, 1.0)
    return factor * self.payload * (self.count or 1)


def _dtype_bytes(name: str) -> int:
  """Bytes of one element of an HLO primitive type: f32 4, bf16 2, f8e4m3fn 1, pred 1."""
  bits = re.match(r"[a-z]+(\d+)", name)
  return max(int(bits.group(1)) // 8, 1) if bits else 1


def _trip_count(while_line_rest: str, condition: str) -> int | None:
  """A while loop's iterations: XLA's known_trip_count, else `i < N` with i from 0 (the
  form jax.lax.scan and fori_loop lower to)."""
  known = _TRIP_COUNT.search(while_line_rest)
  if known:
    return int(known.group(1))
  constants = _CONSTANT.findall(condition)
  if _LOOP_BOUND.search(condition) and len(constants) == 1:
    return int(constants[0])
  return None


def transfers(hlo_text: str) -> list[Transfer]:
  """The cross-slice transfers of one chip in a compiled program (`compiled.as_text()`)."""
  bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
  entry = re.search(r"^ENTRY %([\w.\-]+)", hlo_text, re.M).group(1)
  # Calls between computations, with how many times each call runs per run of the caller.
  calls: dict[str, list[tuple[str, int | None]]] = {name: [] for name in bodies}
  for name, body in bodies.items():
    for line in body.splitlines():
      loop = _WHILE.search(line)
      if loop:
        condition, loop_body, rest = loop.groups()
        calls[name].append((loop_body, _trip_count(rest, bodies.get(condition, ""))))
        continue
      for group in _CALLED.findall(line):
        calls[name].extend((callee.strip().lstrip("%"), 1) for callee in group.split(","))
  sends = {name: [(kind, math.prod(int(d) for d in dims.split(",") if d) *
                   _dtype_bytes(dtype)) for dtype, dims, kind in _SEND.findall(body)]
           for name, body in bodies.items()}
  found: list[Transfer] = []

  def visit(name: str, count: int | None) -> None:
    found.extend(Transfer(kind, payload, count) for kind, payload in sends.get(name, []))
    for callee, times in calls.get(name, []):
      visit(callee, None if count is None or times is None else count * times)

  visit(entry, 1)
  return found
