"""Flags shared by the command-line tools (`train.py`, `eval.py`, predict, visualize)."""

from typing import Union

from absl import app
from absl import flags


def define_distributed_flags() -> None:
  """`--coordinator_address --num_processes --process_id`, for `jax.distributed`."""
  flags.DEFINE_string("coordinator_address", "",
                      "host:port of process 0, for jax.distributed.")
  flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_distributed() -> None:
  """Starts `jax.distributed` from the flags of :func:`define_distributed_flags`."""
  from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


def define_checkpoint_step_flag() -> None:
  flags.DEFINE_string("checkpoint_step", "latest",
                      "A step number, 'latest' or 'best' (by validation top-1).")


def checkpoint_step() -> Union[int, str]:
  """The value of `--checkpoint_step`: 'latest', 'best' or a step number."""
  step = flags.FLAGS.checkpoint_step
  if step in ("latest", "best"):
    return step
  if not step.isdigit():
    raise app.UsageError(f"--checkpoint_step must be a step, 'latest' or 'best', "
                         f"got {step!r}")
  return int(step)
