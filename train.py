"""Trains a model: `python train.py --config configs/X.py --workdir DIR`.

Resumes from the newest readable checkpoint in DIR, which may be a bucket
(`gs://...`). Override any config key with `--config.a.b=value`. Clusters that JAX
detects (Cloud TPU pod slices, GKE, SLURM inside `srun`, Open MPI) start
`jax.distributed` by themselves (`--single_process` prevents it); elsewhere pass
`--coordinator_address host:port --num_processes N --process_id I` to every process.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gta_jax import cli
from gta_jax import tasks
from gta_jax.training import loop
from gta_jax.training import writers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  cli.initialize_distributed()
  logging.info("config:\n%s", _CONFIG.value)
  summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                    validate=tasks.make_validator(_CONFIG.value,
                                                                  _WORKDIR.value))
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and summary:
    print(f"final {_CONFIG.value.data.eval_split} {tasks.describe(summary)}", flush=True)


if __name__ == "__main__":
  cli.run(main)
