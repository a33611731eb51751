"""Evaluates a checkpoint on a split (what `eval.py` runs)."""

import os
from typing import Any, Dict, Optional, Tuple, Union

import jax
import ml_collections
from absl import logging

from gta_jax.data import pipeline
from gta_jax.evaluation import evaluator
from gta_jax.evaluation import metrics
from gta_jax.evaluation import reports
from gta_jax.models import registry
from gta_jax.training import checkpoint
from gta_jax.training import sharding
from gta_jax.training import steps


def validate(config: ml_collections.ConfigDict, eval_step, variables, mesh,
             split: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Multi-view `(predictions, summary)` on `split` (every process gets both)."""
  loader = pipeline.make_eval_loader(config, split, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  predictions = evaluator.predict(eval_step, variables, loader, mesh)
  return predictions, metrics.summarize(predictions["probs"], predictions["label"])


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: Union[int, str] = "latest", split: Optional[str] = None
             ) -> Dict[str, Any]:
  """Evaluates checkpoint `step` of `workdir` on `split` and writes the reports.

  Args:
    config: the experiment config.
    workdir: the training run's directory.
    step: a step, 'latest' or 'best'.
    split: defaults to `config.eval.split`.

  Returns:
    The summary written to `WORKDIR/eval/<split>_step<N>.json`.
  """
  split = split or config.eval.split
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.eval.batch_size, "config.eval.batch_size")
  meta = pipeline.prepare_dataset(config)
  variables, step = checkpoint.restore_variables(config, workdir, step, mesh)
  eval_step = steps.make_eval_step(registry.build_model(config), mesh)
  predictions, summary = validate(config, eval_step, variables, mesh, split)
  summary.update(step=step, split=split,
                 num_views=config.eval.num_clips * config.eval.num_crops)
  if jax.process_index() == 0:
    path = reports.write_reports(os.path.join(workdir, "eval"), split, step, summary,
                                 predictions, meta.class_names)
    logging.info("wrote %s", path)
  return summary
