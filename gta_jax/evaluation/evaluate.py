"""Evaluates a checkpoint on a split (what `eval.py` runs), and validates during training.

:func:`make_validator` builds the callback that `train.py` hands to
`training.loop.train_and_evaluate`: the cheap `config.eval.during_training` protocol
(by default 1 clip x 1 centre crop on at most `max_videos` videos) during training,
and the full multi-view protocol of `config.eval` at the end.
"""

from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import ml_collections
from absl import logging

from gta_jax import paths
from gta_jax.data import pipeline
from gta_jax.data import preparation
from gta_jax.evaluation import evaluator
from gta_jax.evaluation import metrics
from gta_jax.evaluation import reports
from gta_jax.models import registry
from gta_jax.training import checkpoint
from gta_jax.training import sharding
from gta_jax.training import steps


def for_devices(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `eval.batch_size` rounded to a multiple of the device count."""
  config = config.copy_and_resolve_references()
  config.eval.batch_size = sharding.round_eval_batch_size(config.eval.batch_size)
  return config


def during_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the views of `config.eval.during_training`."""
  config = config.copy_and_resolve_references()
  config.eval.num_clips = config.eval.during_training.num_clips
  config.eval.num_crops = config.eval.during_training.num_crops
  return config


def validate(config: ml_collections.ConfigDict, eval_step, variables, mesh,
             split: str, max_videos: int = 0, progress: bool = False
             ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Multi-view `(predictions, summary)` on `split` (every process gets both).

  `config.eval` gives the views and the batch size; `max_videos > 0` evaluates an
  evenly spread subset of that many videos; `progress` shows a bar. `predictions`
  holds `features` too when `eval_step` gives them (`steps.make_eval_step`'s
  `feature_layer`).
  """
  loader = pipeline.make_eval_loader(config, split, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     max_videos=max_videos)
  predictions = evaluator.predict(eval_step, variables, loader, mesh, progress)
  summary = metrics.summarize(predictions["probs"], predictions["label"])
  summary.update(split=split, num_views=config.eval.num_clips * config.eval.num_crops)
  return predictions, summary


def make_validator(config: ml_collections.ConfigDict, mesh=None
                   ) -> Callable[[Any, bool], Dict[str, Any]]:
  """The validation callback of `training.loop.train_and_evaluate`.

  Returns:
    `validate(variables, final)`: the summary on `config.data.eval_split`, with the
    full protocol if `final`, else the `config.eval.during_training` one.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  full = for_devices(config)
  quick = during_training(full)
  eval_step = steps.make_eval_step(registry.build_model(config), mesh)
  split = config.data.eval_split

  def validate_fn(variables, final: bool) -> Dict[str, Any]:
    if final:
      return validate(full, eval_step, variables, mesh, split)[1]
    return validate(quick, eval_step, variables, mesh, split,
                    max_videos=config.eval.during_training.max_videos)[1]

  return validate_fn


def evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike,
             step: Union[int, str] = "latest", split: Optional[str] = None
             ) -> Dict[str, Any]:
  """Evaluates checkpoint `step` of `workdir` on `split` and writes the reports.

  Args:
    config: the experiment config.
    workdir: the training run's directory (local or remote).
    step: a step, 'latest' or 'best'.
    split: defaults to `config.eval.split`.

  Returns:
    The summary written to `WORKDIR/eval/<split>_step<N>.json`.
  """
  split = split or config.eval.split
  mesh = sharding.make_mesh()
  config = for_devices(config)
  meta = preparation.prepare_dataset(config)
  variables, step = checkpoint.restore_variables(config, workdir, step, mesh)
  eval_step = steps.make_eval_step(registry.build_model(config), mesh)
  predictions, summary = validate(config, eval_step, variables, mesh, split, progress=True)
  summary["step"] = step
  if jax.process_index() == 0:
    path = reports.write_reports(paths.path(workdir) / "eval", split, step, summary,
                                 predictions, meta.class_names)
    logging.info("wrote %s", path)
  return summary
