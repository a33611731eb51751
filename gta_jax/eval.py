"""Evaluates a checkpoint: `python -m gta_jax.eval --config NAME|FILE --workdir DIR`.

The same command as `gta-jax-eval` and, in a clone of the repository, `python
eval.py`. `--config` is the recipe's name or the config file the run was trained
with. Multi-view testing (`config.eval.num_clips` x `config.eval.num_crops` views,
softmax averaged) of the latest checkpoint (or `--checkpoint_step N`, or `best`) on
`--split` (default `config.eval.split`). Writes `DIR/eval/<split>_step<N>.json`,
per-video predictions and a confusion matrix (CSV and PNG); DIR may be a bucket
(`gs://...`). `config.eval.batch_size` is rounded to a multiple of the device count.
"""

import json

from absl import app
from absl import flags

from gta_jax import cli
from gta_jax import tasks
from gta_jax.training import writers

_CONFIG = cli.define_config_flag("Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
cli.define_checkpoint_step_flag()
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (config.eval.split).")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  step = cli.checkpoint_step()
  writers.quiet_library_logs()
  cli.initialize_distributed()
  summary = tasks.evaluate(_CONFIG.value, _WORKDIR.value, step, _SPLIT.value)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(json.dumps(summary))
    print(f"{summary['split']} step {summary['step']}: {tasks.describe(summary)}", flush=True)


def run():
  """The command (`gta-jax-eval`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
