"""Entry point: python -m mae_jax.main --config=configs/base.py --workdir=DIR.

Every config field can be set with --config.<field>=<value> (e.g. --config.batch_size=256,
--config.model.mask_ratio=0.6); list them with
  python -m mae_jax.main --config=configs/base.py --print_config

On TPU pods and Slurm GPU clusters pass --jax_distributed (the launchers in launch/ do):
jax.distributed.initialize() then finds the coordinator and the process ids by itself.
Elsewhere give --coordinator_address, --num_processes and --process_id.
"""
import logging
import os
import signal
import sys
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import ConfigDict, config_flags

from mae_jax import compile_cache, trainer

FLAGS = flags.FLAGS

HELP_FLAGS = {"--help": True, "-help": True, "-h": True, "-?": True, "--helpshort": True,
              "--helpfull": False}
PACKAGE_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  name) + os.sep for name in ("mae_jax", "configs"))


def define_flags() -> None:
  """The command line's flags; defined only when this module runs as the program, so that
  importing it (and mae_jax.aot, which shares flag names) stays side-effect free."""
  config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections), e.g. "
                                  "configs/demo.py; fields by --config.<field>=<value>.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go: a directory "
                      "or a bucket path (gs://bucket/path, with the gcs extra); a run in an "
                      "existing workdir resumes from its newest checkpoint.")
  flags.DEFINE_bool("print_config", False, "Print the config (every field, with the overrides "
                    "applied) and exit.")
  flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (multi-host).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
  flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation for multi-process "
                      "CPU runs, e.g. 'gloo'.")


def fail(message: str) -> NoReturn:
  """A user error: one line on stderr, exit code 1."""
  sys.stderr.write(f"error: {message}\n")
  sys.exit(1)


def innermost_message(e: BaseException) -> str:
  """The text of `e`, unwrapping exceptions whose argument is another exception."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with help on stdout (exit 0) and config mistakes as one line; the
  same for every command line that takes --config (main, aot)."""
  for arg in argv[1:]:
    if arg in HELP_FLAGS:
      app.usage(shorthelp=HELP_FLAGS[arg], writeto_stdout=True, exitcode=0)
  try:
    argv = FLAGS(argv)
    FLAGS.config  # config files load lazily: a missing one fails here
  except (AttributeError, KeyError) as e:  # an override of a field the config lacks
    field, _, hint = innermost_message(e).partition("\n")
    fail(f"the config has no field {field}" + (f"; {hint[0].lower()}{hint[1:]}" if hint
                                               else ""))
  except flags.Error as e:  # a bad value, or an error inside the config file
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}")
  except OSError as e:
    while e.__cause__ is not None:
      e = e.__cause__
    fail(f"cannot load --config: {e}")
  return argv


def parse_flags(argv: list[str]) -> list[str]:
  """`parse_config_flags`, then main's required flags."""
  argv = parse_config_flags(argv)
  if FLAGS.config is None:
    fail("--config is required, e.g. --config=configs/demo.py")
  if FLAGS.workdir is None and not FLAGS.print_config:
    fail("--workdir is required: where checkpoints, metrics and images go")
  return argv


def is_check(e: BaseException) -> bool:
  """True for the errors our own checks raise: a ValueError or FileNotFoundError raised in
  mae_jax or configs/, whose message names the problem. Anything else is a bug and keeps
  its traceback."""
  if not isinstance(e, (ValueError, FileNotFoundError)) or e.__traceback__ is None:
    return False
  tb = e.__traceback__
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIRS)


def length_note(config: ConfigDict) -> str:
  """Which of the two ways to give the run's length and warmup --print_config's reader
  should believe: steps when set, else epochs."""
  def which(steps: str, epochs: str, is_set) -> str:
    if is_set(config[steps]):
      return f"{steps}={config[steps]} (overrides {epochs})"
    return f"{epochs}={config[epochs]} ({steps}={config[steps]}: unset)"
  return (f"# length: {which('total_steps', 'epochs', lambda v: v > 0)}; "
          f"warmup: {which('warmup_steps', 'warmup_epochs', lambda v: v >= 0)}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if FLAGS.print_config:
    print(FLAGS.config)
    print(length_note(FLAGS.config))
    return
  # Our progress at INFO; libraries (Orbax logs every save at INFO) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mae_jax").setLevel(logging.INFO)
  compile_cache.enable(FLAGS.config.get("compilation_cache_dir"))
  if FLAGS.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
  if FLAGS.jax_distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  logging.getLogger("mae_jax").info(
      "process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.devices()[0].device_kind)
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    if not is_check(e):
      raise
    fail(str(e))
  except KeyboardInterrupt as e:  # Ctrl-C: the loop saved and said so (its message), or not
    if not e.args:
      sys.stderr.write("interrupted: nothing saved since the last checkpoint\n")
    sys.exit(130)


if __name__ == "__mp_main__":
  # This module as a worker process of this command (grain's decoders; multiprocessing's
  # spawn runs it under this name before the worker's own code). A Ctrl-C on a terminal goes
  # to the whole process group; the main process saves and stops its workers itself.
  signal.signal(signal.SIGINT, signal.SIG_IGN)

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
