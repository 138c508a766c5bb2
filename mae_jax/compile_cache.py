"""JAX's persistent compilation cache: a restarted run loads its compiled step from disk.

`enable(setting)` once per process, before anything compiles (every entry point that builds a
step calls it: `mae_jax.main`, `mae_jax.aot`, the benchmarks); `watch(what)` around the first
call of a step logs one line saying whether the cache had it.

Where the cache lives (`config.compilation_cache_dir`, `enable`'s argument):
  None (the default)  $JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/mae_jax/xla
                      ($XDG_CACHE_HOME/mae_jax/xla), one per user;
  ''                  off;
  a path              that directory (a bucket path, gs://..., works too: JAX reads it).
JAX_ENABLE_COMPILATION_CACHE=false (JAX's own switch) turns it off whatever the setting.

JAX keys an entry by a hash of the program's HLO, the compile options and flags, the devices
and the jaxlib version, so an entry is never used for another program or machine. Only
process 0 writes entries: on several hosts, point the cache to a directory they share.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from typing import Iterator

import jax

log = logging.getLogger(__name__)

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
# JAX's monitoring events (jax/_src/compiler.py, compilation_cache.py; the same names from
# JAX 0.4.3x to 0.12): one request per compile while the cache is on, a hit when an entry
# was loaded, a miss when a new entry was written.
REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
HIT = "/jax/compilation_cache/cache_hits"
MISS = "/jax/compilation_cache/cache_misses"


def default_dir() -> str:
  """The per-user cache directory: $XDG_CACHE_HOME/mae_jax/xla, or ~/.cache/mae_jax/xla."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "mae_jax", "xla")


def resolve(setting: str | None) -> str | None:
  """The cache directory for a `compilation_cache_dir` setting; None when the cache is off."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  if setting is None:
    return os.environ.get(ENV_DIR) or default_dir()
  return os.path.expanduser(setting) if setting else None


def enable(setting: str | None) -> str | None:
  """Turns the cache on in the directory `setting` names (see the module docstring), or off;
  returns the directory. Call before the first compile: JAX opens its cache once."""
  directory = resolve(setting)
  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    jax.config.update("jax_compilation_cache_dir", directory)
  return directory


@contextlib.contextmanager
def watch(what: str, enabled: bool = True) -> Iterator[None]:
  """Logs one line on leaving: did the compiles inside hit or miss the persistent cache?

  Put around the first call of a jitted step (tracing and compiling happen in the call;
  other programs compiled inside would count too). `enabled=False` does nothing.
  """
  if not enabled:
    yield
    return
  events = collections.Counter()

  def listener(event: str, **kwargs) -> None:
    del kwargs
    if event in (REQUEST, HIT, MISS):
      events[event] += 1

  jax.monitoring.register_event_listener(listener)
  start = time.perf_counter()
  try:
    yield
  finally:
    seconds = time.perf_counter() - start
    jax.monitoring.unregister_event_listener(listener)
    log.info("compilation cache: %s", verdict(what, seconds, events[REQUEST], events[HIT],
                                              events[MISS]))


def verdict(what: str, seconds: float, requests: int, hits: int, misses: int) -> str:
  """The start-up line's text for the compiles of `what` that took `seconds`."""
  directory = jax.config.jax_compilation_cache_dir
  if requests == 0:
    state = "off" if not jax.config.jax_enable_compilation_cache or not directory else "on"
    return f"{state}; the {what} compiled (or was already in memory) in {seconds:.1f} s"
  if hits == requests:
    return f"hit: the {what} loaded from {directory} in {seconds:.1f} s"
  if misses:
    return f"miss: the {what} compiled in {seconds:.1f} s, saved to {directory}"
  reason = ("only process 0 writes" if jax.process_index() != 0 else
            f"compiled in under jax_persistent_cache_min_compile_time_secs="
            f"{jax.config.jax_persistent_cache_min_compile_time_secs:g} s")
  return f"miss: the {what} compiled in {seconds:.1f} s, not saved ({reason})"
