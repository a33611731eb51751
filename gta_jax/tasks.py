"""What differs between the tasks a config can name (`config.task`).

* `classification`: clips -> class logits (`gta_jax.training.steps`,
  `gta_jax.evaluation`); validation score `top1`.
* `retrieval`: clips and captions -> one embedding space (`gta_jax.retrieval`);
  validation score `rsum` (R@1 + R@5 + R@10 of both directions).

The training loop, the checkpoints and the command-line tools are the same for both;
they ask this module for the task's train step, train loader, validator and evaluation.
"""

from typing import Any, Callable, Dict, Optional, Union

import ml_collections

from gta_jax import paths

TASKS = ("classification", "retrieval")


def task(config: ml_collections.ConfigDict) -> str:
  """`config.task`, checked."""
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {TASKS}, got {name!r}")
  return name


def score_key(config: ml_collections.ConfigDict) -> str:
  """The validation summary's key that picks the best checkpoint and drives the
  plateau schedule."""
  if task(config) == "retrieval":
    from gta_jax.retrieval import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.SCORE
  return "top1"


def make_train_step(config: ml_collections.ConfigDict, model, tx, lr_fn, mesh) -> Callable:
  """The task's jitted `step(state, batch) -> (state, metrics)`."""
  if task(config) == "retrieval":
    from gta_jax.retrieval import steps  # pylint: disable=g-import-not-at-top
    return steps.make_train_step(model, tx, loss=config.retrieval.loss,
                                 margin=config.retrieval.margin, learning_rate_fn=lr_fn,
                                 dropout_seed=config.seed, mesh=mesh)
  from gta_jax.training import steps  # pylint: disable=g-import-not-at-top
  return steps.make_train_step(model, tx, learning_rate_fn=lr_fn,
                               label_smoothing=config.optim.label_smoothing,
                               dropout_seed=config.seed, mesh=mesh)


def make_train_loader(config: ml_collections.ConfigDict, workdir: paths.PathLike, *,
                      process_index: int, process_count: int, mesh):
  """The task's training batches (`pipeline.make_train_loader`; retrieval's
  `retrieval.data.make_train_loader` adds a random caption of each clip)."""
  if task(config) == "retrieval":
    from gta_jax.retrieval import data  # pylint: disable=g-import-not-at-top
    return data.make_train_loader(config, workdir, process_index=process_index,
                                  process_count=process_count, mesh=mesh)
  from gta_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_train_loader(config, seed=config.seed, process_index=process_index,
                                    process_count=process_count, mesh=mesh)


def make_validator(config: ml_collections.ConfigDict, workdir: paths.PathLike,
                   mesh=None) -> Callable[[Any, bool], Dict[str, Any]]:
  """The validation callback of `training.loop.train_and_evaluate`."""
  if task(config) == "retrieval":
    from gta_jax.retrieval import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.make_validator(config, workdir, mesh)
  from gta_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.make_validator(config, mesh)


def evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike,
             step: Union[int, str] = "latest", split: Optional[str] = None
             ) -> Dict[str, Any]:
  """`eval.py`: evaluates a checkpoint and writes `WORKDIR/eval/<split>_step<N>.json`."""
  if task(config) == "retrieval":
    from gta_jax.retrieval import evaluate as retrieval_eval  # pylint: disable=g-import-not-at-top
    return retrieval_eval.evaluate(config, workdir, step, split)
  from gta_jax.evaluation import evaluate as classification_eval  # pylint: disable=g-import-not-at-top
  return classification_eval.evaluate(config, workdir, step, split)


def describe(summary: Dict[str, Any]) -> str:
  """A validation summary in one line."""
  if "t2v_r1" in summary:
    return (f"text-to-video R@1 {summary['t2v_r1']:.4f} R@5 {summary['t2v_r5']:.4f} "
            f"R@10 {summary['t2v_r10']:.4f} MedR {summary['t2v_medr']:g}, video-to-text "
            f"R@1 {summary['v2t_r1']:.4f} R@5 {summary['v2t_r5']:.4f} over "
            f"{summary['num_videos']} videos and {summary['num_captions']} captions")
  return (f"top-1 {summary['top1']:.4f}"
          + (f" top-5 {summary['top5']:.4f}" if "top5" in summary else "")
          + (f" over {summary['num_videos']} videos" if "num_videos" in summary else ""))
