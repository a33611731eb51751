"""Evaluates a checkpoint: `python eval.py --config configs/X.py --workdir DIR`.

Multi-view testing (`config.eval.num_clips` x `config.eval.num_crops` views, softmax
averaged) of the latest checkpoint (or `--checkpoint_step N`, or `best`) on
`--split` (default `config.eval.split`). Writes `DIR/eval/<split>_step<N>.json`,
per-video predictions and a confusion matrix (CSV and PNG).
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from gta_jax.evaluation import evaluate
from gta_jax.training import sharding
from gta_jax.training import writers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_string("checkpoint_step", "latest",
                            "A step number, 'latest' or 'best' (val top-1).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (config.eval.split).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0, for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  step = _STEP.value
  if step not in ("latest", "best"):
    if not step.isdigit():
      raise app.UsageError(f"--checkpoint_step must be a step, 'latest' or 'best', "
                           f"got {step!r}")
    step = int(step)
  writers.quiet_library_logs()
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  summary = evaluate.evaluate(_CONFIG.value, _WORKDIR.value, step, _SPLIT.value)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(json.dumps(summary))
    print(f"{summary['split']} step {summary['step']}: top-1 {summary['top1']:.4f} "
          f"top-5 {summary['top5']:.4f} over {summary['num_videos']} videos", flush=True)


if __name__ == "__main__":
  app.run(main)
