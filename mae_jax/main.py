"""Entry point: python -m mae_jax.main --config=configs/base.py --workdir=DIR.

On TPU pods and Slurm GPU clusters pass --jax_distributed (the launchers in launch/ do):
jax.distributed.initialize() then finds the coordinator and the process ids by itself.
Elsewhere give --coordinator_address, --num_processes and --process_id.
"""
import logging

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags

from mae_jax import trainer

config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go; a run in an "
                    "existing workdir resumes from its newest checkpoint.")
flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation for multi-process "
                    "CPU runs, e.g. 'gloo'.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our progress at INFO; libraries (Orbax logs every save at INFO) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mae_jax").setLevel(logging.INFO)
  if FLAGS.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
  if FLAGS.jax_distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  logging.getLogger("mae_jax").info(
      "process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.devices()[0].device_kind)
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
