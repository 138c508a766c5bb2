"""Profiler traces of chosen train steps, where TensorBoard's profile plugin and XProf find them.

With `config.profile.steps` > 0 the loop traces that many train steps with `jax.profiler`,
from step `config.profile.first_step` on (numbered as the logs number them: step k takes the
state from k - 1 to k; step 1 compiles, so start later; a run resumed past the first step
traces nothing), into
  WORKDIR/tensorboard/plugins/profile/<date_time>/<host>.xplane.pb   (TensorBoard, XProf)
  WORKDIR/tensorboard/plugins/profile/<date_time>/perfetto_trace.json.gz   (ui.perfetto.dev,
                                                       and `python -m mae_jax.trace_report`)
on process 0, or on every process with `config.profile.all_processes`.
"""
from __future__ import annotations

import logging

import jax
import ml_collections

from mae_jax import storage

log = logging.getLogger(__name__)


def trace_dir(workdir: str) -> str:
  """Where the traces go: the TensorBoard log directory (the plugin adds plugins/profile/)."""
  return str(storage.path(workdir) / "tensorboard")


def check(profile: ml_collections.ConfigDict) -> None:
  """Bad `config.profile` values, as one clear error before anything runs."""
  if profile.steps < 0 or profile.first_step < 1:
    raise ValueError(f"config.profile.steps must be >= 0 and first_step >= 1, not "
                     f"{profile.steps} and {profile.first_step}")


class StepTracer:
  """Starts a trace before the first chosen step and stops it once the last one has finished
  on the device (its outputs are ready), so the trace holds whole steps."""

  def __init__(self, profile: ml_collections.ConfigDict, workdir: str):
    wanted = profile.steps > 0 and (profile.all_processes or jax.process_index() == 0)
    self._start = profile.first_step - 1 if wanted else -1  # the state's step before them
    self._stop = profile.first_step + profile.steps - 1 if wanted else -1  # after them
    self._dir = trace_dir(workdir)
    self._active = False

  def before(self, step: int, previous_outputs) -> None:
    """Called before the train step from state step `step`; `previous_outputs` are the last
    step's (waited for, so that the trace does not start mid-step)."""
    if step == self._start:
      jax.block_until_ready(previous_outputs)
      jax.profiler.start_trace(self._dir, create_perfetto_trace=True)
      self._active = True

  def after(self, step: int, outputs) -> None:
    """Called after the train step to state step `step` was dispatched, with its outputs."""
    if self._active and step == self._stop:
      jax.block_until_ready(outputs)
      self.close()
      log.info("profiler trace of steps %d-%d in %s/plugins/profile (python -m "
               "mae_jax.trace_report %s)", self._start + 1, step, self._dir, self._dir)

  def close(self) -> None:
    """Stops a trace still running (a run that ended or failed inside the traced steps)."""
    if self._active:
      self._active = False
      jax.profiler.stop_trace()
