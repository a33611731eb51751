"""The training loop (what `train.py` runs).

`train_and_evaluate(config, workdir)` trains for `config.total_steps`, resuming
from the latest checkpoint in `workdir` if there is one (train state and data
iterator, so the resumed run takes the same batches and reaches the same
weights). Every `eval_every_steps` (and at the end) it validates on
`config.data.eval_split`; it checkpoints every `checkpoint_every_steps`, after
each validation, at the end and on SIGTERM (then it returns normally). Metrics
reach the host every `log_every_steps` only, so the device is never waited on
inside the hot loop; a non-finite loss stops the run before it is checkpointed.
"""

import signal
import time
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gta_jax.data import pipeline
from gta_jax.evaluation import evaluate as evaluate_lib
from gta_jax.training import checkpoint
from gta_jax.training import sharding
from gta_jax.training import state as state_lib
from gta_jax.training import steps
from gta_jax.training import writers


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


class PreemptionWatcher:
  """Has a SIGTERM arrived? Multi-process runs agree on the step to stop at."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.requested = False
    if not self.multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if not self.multi_process:
      signal.signal(signal.SIGTERM, self._previous)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for loop settings that cannot work."""
  for key in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"config.{key} must be a positive int, got {config[key]!r}")
  if not isinstance(config.eval_every_steps, int) or config.eval_every_steps < 0:
    raise ValueError("config.eval_every_steps must be an int >= 0 (0: only at the end), "
                     f"got {config.eval_every_steps!r}")
  if not 0 <= config.optim.label_smoothing < 1:
    raise ValueError("config.optim.label_smoothing must be in [0, 1), got "
                     f"{config.optim.label_smoothing!r}")
  sharding.check_batch_size(config.batch_size, "config.batch_size")
  sharding.check_batch_size(config.eval.batch_size, "config.eval.batch_size")


def prepare_data(config: ml_collections.ConfigDict) -> Any:
  """Prepares the dataset on process 0 first, then opens it everywhere."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      pipeline.prepare_dataset(config)
    multihost_utils.sync_global_devices("gta_jax: dataset prepared")
  return pipeline.prepare_dataset(config)


def _fetch_train_metrics(pending, halt_on_nonfinite: bool) -> Optional[Dict[str, float]]:
  """Brings the pending per-step metrics to the host; their window means."""
  if not pending:
    return None
  host = jax.device_get([m for _, m in pending])
  losses = np.array([m["loss"] for m in host])
  bad = np.flatnonzero(~np.isfinite(losses))
  if len(bad) and halt_on_nonfinite:
    step = pending[bad[0]][0]
    raise NonFiniteLossError(
        f"the loss is {losses[bad[0]]} at step {step}: stopping (lower "
        "config.optim.base_lr, or set config.optim.grad_clip_norm); the checkpoints "
        "in the workdir are from before it")
  means = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "accuracy",
                                                              "grad_norm")}
  means["lr"] = float(host[-1]["lr"])
  pending.clear()
  return means


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Optional[Dict[str, Any]]:
  """Trains (or resumes) and validates; returns the last validation summary.

  Raises:
    ValueError: bad config values, or a checkpoint of another model in `workdir`.
    NonFiniteLossError: the loss became NaN or infinite.
  """
  check_config(config)
  mesh = sharding.make_mesh()
  meta = prepare_data(config)
  model, tx, lr_fn, abstract_state = state_lib.build(config, mesh)
  train_iter = iter(pipeline.make_train_loader(
      config, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count()))
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    state = state_lib.initial_state(config, model, tx, mesh)
  else:
    logging.info("resuming from %s/%d", ckpt.directory, latest)
    state = ckpt.restore(latest, abstract_state, config, train_iter)
  start = int(jax.device_get(state.step))
  logging.info("%s: %d classes, %d training videos; %d devices in %d processes; "
               "steps %d -> %d", meta.name, meta.num_classes,
               meta.num_examples.get(config.data.train_split, -1), jax.device_count(),
               jax.process_count(), start, config.total_steps)

  train_step = steps.make_train_step(
      model, tx, learning_rate_fn=lr_fn, label_smoothing=config.optim.label_smoothing,
      dropout_seed=config.seed, mesh=mesh)
  eval_step = steps.make_eval_step(model, mesh)
  writer = writers.MetricWriter(workdir)
  preemption = PreemptionWatcher()
  summary = (ckpt.manager.metrics(latest) or None) if latest else None
  pending = []
  window_start, window_steps = time.perf_counter(), 0
  try:
    with writers.progress_bar(config.total_steps, start) as bar:
      for step in range(start + 1, config.total_steps + 1):
        batch = sharding.shard_batch(next(train_iter), mesh)
        state, step_metrics = train_step(state, batch)
        pending.append((step, step_metrics))
        window_steps += 1
        bar.update(1)
        last = step == config.total_steps
        if step % config.log_every_steps == 0 or last:
          means = _fetch_train_metrics(pending, config.halt_on_nonfinite)
          elapsed = time.perf_counter() - window_start
          means.update(steps_per_sec=window_steps / elapsed,
                       examples_per_sec=window_steps * config.batch_size / elapsed)
          writer.write("train", step, means, "train")
          bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.3g}")
          window_start, window_steps = time.perf_counter(), 0

        validate = last or (config.eval_every_steps
                            and step % config.eval_every_steps == 0)
        stop = preemption.should_stop(step)
        if validate or stop or step % config.checkpoint_every_steps == 0:
          _fetch_train_metrics(pending, config.halt_on_nonfinite)
          scores = None
          if validate:
            _, summary = evaluate_lib.validate(config, eval_step, state.variables, mesh,
                                               config.data.eval_split)
            summary["split"] = config.data.eval_split
            writer.write("eval", step, summary, config.data.eval_split)
            logging.info("step %d: %s top-1 %.4f", step, config.data.eval_split,
                         summary["top1"])
            scores = {checkpoint.BEST_METRIC: summary["top1"]}
            if config.optim.schedule == "plateau":
              state = _apply_plateau(state, summary["top1"], config, mesh)
          ckpt.save(step, state, train_iter, config, metrics=scores)
          window_start, window_steps = time.perf_counter(), 0
        if stop:
          logging.warning("SIGTERM: saved step %d, exiting", step)
          break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    preemption.close()
  return summary


def _apply_plateau(state, top1: float, config, mesh):
  scale, best, count = state_lib.update_plateau(state, top1, config)
  new = sharding.replicate(
      {"lr_scale": np.float32(scale), "plateau_best": np.float32(best),
       "plateau_count": np.int32(count)}, mesh)
  return state.replace(**new)
