"""Trains a model: `python -m gta_jax.train --config NAME|FILE --workdir DIR`.

The same command as `gta-jax-train` and, in a clone of the repository, `python
train.py`. `--config` is a recipe's name (`python -m gta_jax.recipes` lists them) or
a config file's path. Resumes from the newest readable checkpoint in DIR, which may
be a bucket (`gs://...`). Override any config key with `--config.a.b=value`.
Clusters that JAX detects (Cloud TPU pod slices, GKE, SLURM inside `srun`, Open MPI)
start `jax.distributed` by themselves (`--single_process` prevents it); elsewhere
pass `--coordinator_address host:port --num_processes N --process_id I` to every
process.

A run that meets a non-finite loss (`config.nonfinite`), a workdir held by another
live run (its lease) or damaged prepared data stops with a one-line message and exit
status 1.
"""

from absl import app
from absl import flags
from absl import logging

from gta_jax import cli
from gta_jax import tasks
from gta_jax.data import pipeline
from gta_jax.training import lease
from gta_jax.training import loop
from gta_jax.training import writers

_CONFIG = cli.define_config_flag("Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  cli.initialize_distributed()
  logging.info("config:\n%s", _CONFIG.value)
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                      validate=tasks.make_validator(_CONFIG.value,
                                                                    _WORKDIR.value))
  except (loop.NonFiniteLossError, lease.WorkdirLeasedError,
          pipeline.CorruptDataError) as e:
    # Events of a run, not bugs: one line for the user, no traceback; exit status 1.
    raise SystemExit(f"train: {type(e).__name__}: {e}") from None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and summary:
    print(f"final {_CONFIG.value.data.eval_split} {tasks.describe(summary)}", flush=True)


def run():
  """The command (`gta-jax-train`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
