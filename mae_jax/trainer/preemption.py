"""When the training loop saves and stops early: SIGTERM (preemption) or SIGINT (Ctrl-C).

Both take one path: the loop finishes the step it is in, saves a checkpoint at it and stops.
On several processes that path is JAX's preemption sync point (`jax.distributed` listens for
SIGTERM on every host and agrees on one step at which all of them save), so a Ctrl-C turns
itself into a SIGTERM of its own process; on one process a flag does. After a Ctrl-C the loop
raises KeyboardInterrupt (the command line exits 130); a second Ctrl-C raises it at once.
A process started with SIGINT ignored (nohup, `cmd &` in a script) keeps ignoring it. The
worker processes of `python -m mae_jax.main` ignore SIGINT (see main.py): a terminal sends
Ctrl-C to the whole process group, and it is the main process's to handle.
"""
from __future__ import annotations

import os
import signal
import threading

import jax


class Preemption:
  """Installed for the duration of a training loop; `close()` restores the signal handlers.

  `reached(step)`: save and stop now (the same answer on every host). `interrupted`: this
  process had a Ctrl-C (else a SIGTERM, or another host's).
  """

  def __init__(self, manager, start_step: int):
    self._manager = manager  # an Orbax CheckpointManager: its sync point spans the hosts
    self._start_step = start_step
    self._multi = jax.process_count() > 1
    self._flag = threading.Event()
    self._previous = {}
    self.interrupted = False
    if threading.current_thread() is not threading.main_thread():
      return  # handlers can only be set from the main thread: SIGTERM/SIGINT act as before
    if not self._multi:  # on several processes JAX's own SIGTERM handler is in place
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_term)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

  def _on_term(self, *_) -> None:
    self._flag.set()

  def _on_interrupt(self, *_) -> None:
    self.interrupted = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler: every host saves at one step
    else:
      self._flag.set()

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self._flag.is_set()
    # JAX's sync point is the call after the furthest host's last one, counted from 0: count
    # this run's steps (1, 2, ...), or a SIGTERM before a resumed run's first step (while it
    # restores and compiles) names a step that has passed, and no host ever stops.
    return self._manager.reached_preemption(step - self._start_step)

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
