"""The training loop (what `train.py` runs).

`train_and_evaluate(config, workdir, validate)` trains for `config.total_steps`,
resuming from the newest readable checkpoint in `workdir` if there is one (train
state and data position, so the resumed run takes the same batches and reaches the
same weights, on any number of processes and devices). It checkpoints every
`checkpoint_every_steps`, after each validation, at the end and on SIGTERM (then it
returns normally; in a multi-process run every process stops at the same step).

Validation is a callback, `validate(variables, final) -> summary`, which `train.py`
builds from `gta_jax.evaluation` (or `gta_jax.retrieval`: `gta_jax.tasks`): every `eval_every_steps` it runs the cheap
in-training protocol (`final=False`, logged as `eval_during_training` rows and
`<split>_during_training/` scalars), at the end the full one (`final=True`, logged
as `eval` rows and `<split>/` scalars). Metrics reach the host every
`log_every_steps` only, so the device is never waited on inside the hot loop.

A non-finite loss or gradient norm (seen in those metrics) or non-finite parameters
(checked before every save) never reach a checkpoint. `config.nonfinite` says what
the run does then: 'stop' raises `NonFiniteLossError`, naming the step, the metric and
the newest (finite) checkpoint; 'rollback' restores that checkpoint, skips the next
`config.nonfinite_skip_batches` batches of the global data stream and trains on, at
most `config.nonfinite_max_rollbacks` times in one run, then stops as 'stop' does.
Every process sees the same global metrics and parameters, so all take the same
decision at the same step.

Process 0 holds the workdir's lease (`lease.py`) while it trains: a second run on the
same workdir is refused, and a run whose lease another took over (its heartbeat had
stopped) raises `lease.LeaseLostError` before its next checkpoint.
"""

import dataclasses
import json
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gta_jax import paths
from gta_jax import tasks
from gta_jax.data import preparation
from gta_jax.training import checkpoint
from gta_jax.training import lease as lease_lib
from gta_jax.training import sharding
from gta_jax.training import state as state_lib
from gta_jax.training import writers

# (variables, final) -> a summary with at least `split` and the task's score
# (`tasks.score_key`: `top1`, or retrieval's `rsum`).
Validate = Callable[[Any, bool], Dict[str, Any]]
Pending = List[Tuple[int, Dict[str, Any]]]


NONFINITE_POLICIES = ("stop", "rollback")
# The per-step metrics whose values must stay finite.
_CHECKED_METRICS = ("loss", "grad_norm")


class NonFiniteLossError(RuntimeError):
  """The loss, gradient norm or parameters became NaN or infinite, and the
  `config.nonfinite` policy stops the run (its message is one line for the user)."""


@dataclasses.dataclass
class NonFinite(Exception):
  """Training reached a non-finite `metric` (`value`) at `step`."""
  step: int
  metric: str
  value: float


class PreemptionWatcher:
  """Has a SIGTERM arrived? Multi-process runs agree on the step to stop at.

  Alone, a process catches SIGTERM itself. With several, `jax.distributed`'s
  preemption service catches it in whichever process gets it and tells the others,
  and `reached_preemption_sync_point` names the same step in all of them.
  """

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
  if config.nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite must be one of {NONFINITE_POLICIES}, got "
                     f"{config.nonfinite!r}")
  for key, value in (("nonfinite_skip_batches", config.nonfinite_skip_batches),
                     ("nonfinite_max_rollbacks", config.nonfinite_max_rollbacks),
                     ("data.max_bad_clips", config.data.max_bad_clips)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"config.{key} must be an int >= 0, got {value!r}")
  if not isinstance(config.lease_timeout_s, (int, float)) or config.lease_timeout_s <= 0:
    raise ValueError(f"config.lease_timeout_s must be > 0 seconds, got "
                     f"{config.lease_timeout_s!r}")
  sharding.check_batch_size(config.batch_size, "config.batch_size")
  if not isinstance(config.eval.batch_size, int) or config.eval.batch_size < 1:
    raise ValueError(f"config.eval.batch_size must be a positive int, got "
                     f"{config.eval.batch_size!r}")


def take_lease(workdir: paths.PathLike, timeout_s: float) -> Optional[lease_lib.Lease]:
  """Process 0 takes the workdir's lease (`lease.py`); every process raises if it
  could not. Returns process 0's lease (None elsewhere).

  Raises:
    lease.WorkdirLeasedError: another live run holds the workdir.
  """
  lease, refusal = None, None
  if jax.process_index() == 0:
    try:
      lease = lease_lib.Lease(workdir, timeout_s).acquire()
    except lease_lib.WorkdirLeasedError as e:
      refusal = e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if refused and refusal is None:
      refusal = lease_lib.WorkdirLeasedError(
          f"process 0 could not take the lease of {workdir} (its log names the holder)")
  if refusal is not None:
    raise refusal
  return lease


def check_lease(lease: Optional[lease_lib.Lease]) -> None:
  """Raises on every process if process 0 lost the workdir's lease (`take_lease`'s
  `lease`; None elsewhere), before a save: two runs must not write the same
  checkpoints.

  Raises:
    lease.LeaseLostError: naming the workdir and the new holder.
  """
  lost = None
  if lease is not None:
    try:
      lease.check()
    except lease_lib.LeaseLostError as e:
      lost = e
  if jax.process_count() > 1:
    if multihost_utils.broadcast_one_to_all(np.int32(lost is not None)) and lost is None:
      lost = lease_lib.LeaseLostError("process 0 lost the workdir's lease (its log names "
                                      "the new holder)")
  if lost is not None:
    raise lost


def prepare_data(config: ml_collections.ConfigDict) -> Any:
  """Prepares the dataset on process 0 first, then opens it everywhere."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      preparation.prepare_dataset(config)
    multihost_utils.sync_global_devices("gta_jax: dataset prepared")
  return preparation.prepare_dataset(config)


def _raise_if_nonfinite(pending: Pending, host: List[Dict[str, Any]]) -> None:
  """Raises `NonFinite` for the earliest pending step with a non-finite loss or
  gradient norm (`host`: the pending metrics on the host)."""
  for (step, _), metrics in zip(pending, host):
    for key in _CHECKED_METRICS:
      if not np.isfinite(metrics[key]):
        pending.clear()
        raise NonFinite(step, key, float(metrics[key]))


def _fetch_train_metrics(pending: Pending) -> Optional[Dict[str, float]]:
  """Brings the pending per-step metrics to the host; their window means.

  Raises:
    NonFinite: a pending step's loss or gradient norm is not finite.
  """
  if not pending:
    return None
  host = jax.device_get([m for _, m in pending])
  _raise_if_nonfinite(pending, host)
  means = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "accuracy",
                                                              "grad_norm")}
  means["lr"] = float(host[-1]["lr"])
  pending.clear()
  return means


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jax.tree.reduce(jax.numpy.logical_and,
                         jax.tree.map(lambda x: jax.numpy.isfinite(x).all(), tree))


class _TrainLog:
  """Per-window train metrics: collects the device's, logs their means."""

  def __init__(self, config: ml_collections.ConfigDict, writer: writers.MetricWriter,
               bar):
    self.config = config
    self.writer = writer
    self.bar = bar
    self.pending: Pending = []
    self.restart_clock()

  def restart_clock(self) -> None:
    self.window_start, self.window_steps = time.perf_counter(), 0

  def add(self, step: int, metrics: Dict[str, Any]) -> None:
    self.pending.append((step, metrics))
    self.window_steps += 1
    self.bar.update(1)

  def write(self, step: int) -> None:
    means = _fetch_train_metrics(self.pending)
    elapsed = time.perf_counter() - self.window_start
    means.update(steps_per_sec=self.window_steps / elapsed,
                 examples_per_sec=self.window_steps * self.config.batch_size / elapsed)
    self.writer.write("train", step, means, "train")
    self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.3g}")
    self.restart_clock()

  def check_finite(self) -> None:
    """Raises `NonFinite` if a pending loss or gradient norm is not finite."""
    _raise_if_nonfinite(self.pending, jax.device_get([m for _, m in self.pending]))


def restore_or_initialize(config, ckpt: checkpoint.Checkpointer, abstract_state, model,
                          tx, mesh, train_iter) -> Tuple[state_lib.TrainState, Any]:
  """The newest readable checkpoint's state (data iterator moved along), else a fresh
  state; and the last validation summary saved with it (or None)."""
  restored = ckpt.restore_latest(abstract_state, config, train_iter)
  if restored is None:
    return state_lib.initial_state(config, model, tx, mesh), None
  state, step = restored
  logging.info("resumed from %s/%d", ckpt.directory, step)
  return state, ckpt.manager.metrics(step) or None


@dataclasses.dataclass
class _Run:
  """What happens between train steps: logs, validations, checkpoints, preemption."""
  config: ml_collections.ConfigDict
  mesh: Any
  ckpt: checkpoint.Checkpointer
  writer: writers.MetricWriter
  train_iter: Any
  validate: Optional[Validate]
  preemption: PreemptionWatcher
  log: _TrainLog
  abstract_state: Any
  lease: Optional[lease_lib.Lease]
  summary: Optional[Dict[str, Any]] = None
  rollbacks: int = 0
  data_wait: float = 0.0  # seconds the loop waited for the next batch
  started: float = dataclasses.field(default_factory=time.perf_counter)

  def next_batch(self) -> Any:
    """The next training batch, on the devices; the wait for it is counted."""
    begin = time.perf_counter()
    batch = next(self.train_iter)
    self.data_wait += time.perf_counter() - begin
    return batch

  def log_data_wait(self) -> None:
    """Logs the fraction of the wall time the loop spent waiting for data."""
    wall = time.perf_counter() - self.started
    logging.info("waited for input data %.1f%% of the %.0f s of training (%.1f s)",
                 100 * self.data_wait / max(wall, 1e-9), wall, self.data_wait)

  def after_step(self, step: int, state) -> Tuple[Any, bool]:
    """Logs, validates and checkpoints as due after `step`; returns `(state, stop)`."""
    c = self.config
    final = step == c.total_steps
    if step % c.log_every_steps == 0 or final:
      self.log.write(step)
    validating = self.validate is not None and bool(
        final or (c.eval_every_steps and step % c.eval_every_steps == 0))
    stop = self.preemption.should_stop(step)
    if validating or stop or step % c.checkpoint_every_steps == 0:
      state = self.checkpoint(step, state, validating, final)
    return state, stop

  def checkpoint(self, step: int, state, validating: bool, final: bool):
    """Saves `step` (validating first if asked); returns the state (plateau applied).

    Raises:
      NonFinite: a pending metric or the state's variables are not finite.
      lease.LeaseLostError: another run took the workdir's lease over.
    """
    check_lease(self.lease)
    self.log.check_finite()
    if not bool(_all_finite(state.variables)):
      raise NonFinite(step, "parameters", float("nan"))
    scores = None
    if validating:
      state = self.run_validation(step, state, final)
      scores = {checkpoint.BEST_METRIC: self.summary[tasks.score_key(self.config)]}
    self.writer.flush()  # before the checkpoint: its rows must survive a kill after it
    self.ckpt.save(step, state, self.train_iter, self.config, metrics=scores)
    self.log.restart_clock()
    return state

  def on_nonfinite(self, bad: NonFinite) -> Tuple[Any, int]:
    """Applies `config.nonfinite` to `bad`; returns the state and step to go on from.

    Raises:
      NonFiniteLossError: the policy is 'stop', the rollbacks are used up, or no
        checkpoint was saved to go back to.
    """
    c = self.config
    self.ckpt.wait()
    latest = self.ckpt.latest_step()
    what = f"non-finite {bad.metric} ({bad.value}) at step {bad.step}"
    where = (f"the newest finite checkpoint is {self.ckpt.directory}/{latest}"
             if latest is not None else "no checkpoint was saved before it")
    if c.nonfinite == "stop":
      rollback = (", or go back to it: --config.nonfinite=rollback" if latest is not None
                  else "")
      raise NonFiniteLossError(
          f"{what}; {where}. Stopped (config.nonfinite='stop'): lower "
          f"config.optim.base_lr or set config.optim.grad_clip_norm{rollback}")
    if latest is None or self.rollbacks >= c.nonfinite_max_rollbacks:
      raise NonFiniteLossError(
          f"{what}; {where}. Stopped after {self.rollbacks} rollbacks "
          f"(config.nonfinite_max_rollbacks={c.nonfinite_max_rollbacks})")
    self.rollbacks += 1
    state = self.ckpt.restore(latest, self.abstract_state, c, self.train_iter)
    position = json.loads(self.train_iter.get_state())["next_batch"]
    self.train_iter.set_state({"next_batch": position + c.nonfinite_skip_batches})
    logging.warning("%s: rolled back to %s/%d and skipped batches %d to %d of the data "
                    "stream (rollback %d of at most %d)", what, self.ckpt.directory,
                    latest, position, position + c.nonfinite_skip_batches - 1,
                    self.rollbacks, c.nonfinite_max_rollbacks)
    self.writer.write("rollback", bad.step, {
        "metric": bad.metric, "restored_step": latest, "data_position": position,
        "skipped_batches": c.nonfinite_skip_batches, "rollbacks": self.rollbacks},
        "rollback")
    self.log.bar.reset(c.total_steps)
    self.log.bar.update(latest)
    self.log.restart_clock()
    return state, latest

  def run_validation(self, step: int, state, final: bool):
    """Runs the callback and logs its summary (see the module docstring)."""
    summary = self.validate(state.variables, final)
    split = summary["split"]
    kind, prefix = ("eval", split) if final else ("eval_during_training",
                                                  f"{split}_during_training")
    self.writer.write(kind, step, summary, prefix)
    logging.info("step %d: %s %s (%s)", step, split, tasks.describe(summary), kind)
    self.summary = summary
    if self.config.optim.schedule == "plateau":
      state = _apply_plateau(state, summary[tasks.score_key(self.config)], self.config,
                             self.mesh)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike,
                       validate: Optional[Validate] = None) -> Optional[Dict[str, Any]]:
  """Trains (or resumes) and validates; returns the last validation summary.

  Args:
    config: the experiment config.
    workdir: the run's directory, local or remote (`gs://...`).
    validate: the validation callback (see the module docstring); None skips
      validation.

  Raises:
    ValueError: bad config values.
    checkpoint.IncompatibleCheckpointError: a checkpoint of another model in `workdir`.
    checkpoint.UnreadableCheckpointsError: checkpoints, none of them readable.
    NonFiniteLossError: non-finite training, and `config.nonfinite` stops the run.
    lease.WorkdirLeasedError: another live run holds `workdir`.
    lease.LeaseLostError: another run took the lease over while this one trained.
  """
  check_config(config)
  lease = take_lease(workdir, config.lease_timeout_s)
  try:
    return _train(config, workdir, validate, lease)
  finally:
    if lease is not None:
      lease.release()


def _train(config: ml_collections.ConfigDict, workdir: paths.PathLike,
           validate: Optional[Validate],
           lease: Optional[lease_lib.Lease]) -> Optional[Dict[str, Any]]:
  """`train_and_evaluate` once the workdir's lease is held."""
  mesh = sharding.make_mesh()
  meta = prepare_data(config)
  model, tx, lr_fn, abstract_state = state_lib.build(config, mesh)
  train_iter = sharding.DevicePrefetcher(iter(tasks.make_train_loader(
      config, workdir, process_index=jax.process_index(),
      process_count=jax.process_count(), mesh=mesh)), mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  writer = writers.MetricWriter(workdir)
  preemption = PreemptionWatcher()
  try:
    state, summary = restore_or_initialize(config, ckpt, abstract_state, model, tx, mesh,
                                           train_iter)
    start = int(jax.device_get(state.step))
    logging.info("%s: %d classes, %d training videos; %d devices in %d processes; "
                 "steps %d -> %d", meta.name, meta.num_classes,
                 meta.num_examples.get(config.data.train_split, -1), jax.device_count(),
                 jax.process_count(), start, config.total_steps)
    train_step = tasks.make_train_step(config, model, tx, lr_fn, mesh)
    with writers.progress_bar(config.total_steps, start) as bar:
      run = _Run(config, mesh, ckpt, writer, train_iter, validate, preemption,
                 _TrainLog(config, writer, bar), abstract_state, lease, summary)
      step = start
      while step < config.total_steps:
        step += 1
        state, metrics = train_step(state, run.next_batch())
        run.log.add(step, metrics)
        try:
          state, stop = run.after_step(step, state)
        except NonFinite as bad:
          state, step = run.on_nonfinite(bad)
          continue
        if stop:
          logging.warning("SIGTERM: saved step %d, exiting", step)
          break
    run.log_data_wait()
  finally:
    train_iter.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    preemption.close()
  return run.summary


def _apply_plateau(state, score: float, config, mesh):
  scale, best, count = state_lib.update_plateau(state, score, config)
  new = sharding.replicate(
      {"lr_scale": np.float32(scale), "plateau_best": np.float32(best),
       "plateau_count": np.int32(count)}, mesh)
  return state.replace(**new)
