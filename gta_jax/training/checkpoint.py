"""Checkpoints with orbax: train state, data-iterator state and config.

Layout: `WORKDIR/checkpoints/<step>/{state,data_position,config}` (the workdir may be
a bucket: orbax writes through `etils.epath` and tensorstore). `state` is the
`TrainState` as a nested dict, `data_position` the position in the global stream of
training batches (`{"next_batch": k, "batch_size": B}`: the same on every process,
so a run may resume on another number of processes or devices) and `config` the
experiment config as JSON. The manager keeps the last `keep_checkpoints` steps and,
besides, the one with the best validation top-1 (saved as the checkpoint's metrics).

:meth:`Checkpointer.restore_latest` resumes from the newest checkpoint that can be
read: an unreadable one (a truncated file, a half-copied folder) is reported, named,
and moved aside to `WORKDIR/checkpoints_unreadable/<step>` (so that the run can save
that step again, and a read that failed for a passing reason loses nothing).

For inference, :func:`restore_variables` gives the `params` and `batch_stats` of
the latest or the best checkpoint of a workdir.

A test hook kills the process inside a save (tests/test_faults_save.py):
`GTA_JAX_TEST_KILL_IN_SAVE=<event>@<n>` sends it SIGKILL when orbax reports `<event>`
(one of its `jax.monitoring` events, e.g. `/jax/orbax/write/background_ts_duration_secs`
once the arrays are written) during the `<n>`-th save of the process. An armed hook
logs a warning; a malformed value is an error naming the variable.
"""

import json
import os
import signal
from typing import Any, Dict, List, Optional, Tuple, Union

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from gta_jax import paths
from gta_jax.training import errors
from gta_jax.training import sharding
from gta_jax.training import state as state_lib

# The checkpoint metric that names the best step: the validation score of the task
# (`tasks.score_key`: top-1, or retrieval's rsum), saved under this key.
BEST_METRIC = "top1"
DATA_ITEM = "data_position"
LEGACY_DATA_ITEM = "data"  # grain's per-process iterator files, before data_position


IncompatibleCheckpointError = errors.IncompatibleCheckpointError


class UnreadableCheckpointsError(RuntimeError):
  """No checkpoint of a run could be restored."""


def checkpoint_dir(workdir: paths.PathLike) -> epath.Path:
  return paths.path(workdir) / "checkpoints"


KILL_HOOK = "GTA_JAX_TEST_KILL_IN_SAVE"
_SAVE_STARTED = "/jax/orbax/write/async/start"  # orbax's first event of each save


def _install_kill_hook() -> None:
  """Installs the test hook that `GTA_JAX_TEST_KILL_IN_SAVE` asks for (see the module
  docstring); once per process.

  Raises:
    ValueError: the variable is not `<event>@<n>` with n >= 1, naming it.
  """
  spec = os.environ.get(KILL_HOOK)
  if not spec or getattr(_install_kill_hook, "done", False):
    return
  event, _, save = spec.rpartition("@")
  if not event or not save.isdigit() or int(save) < 1:
    raise ValueError(f"{KILL_HOOK}={spec!r}: expected <orbax event>@<save number from "
                     f"1>, e.g. {_SAVE_STARTED}@3 (a test hook: unset it to train)")
  save = int(save)
  _install_kill_hook.done = True
  logging.warning("%s=%s: this process kills itself (SIGKILL) when orbax reports %s "
                  "during its save number %d (a test hook).", KILL_HOOK, spec, event, save)
  saves = [0]

  def listener(name: str, *unused_args, **unused_kwargs) -> None:
    saves[0] += name == _SAVE_STARTED
    if name == event and saves[0] == save:
      os.kill(os.getpid(), signal.SIGKILL)

  jax.monitoring.register_event_listener(listener)
  jax.monitoring.register_event_duration_secs_listener(listener)


class Checkpointer:
  """An orbax `CheckpointManager` for train runs (see the module docstring).

  Args:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep (the best one stays besides).
    read_only: for evaluation and inference.
  """

  def __init__(self, workdir: paths.PathLike, keep: int = 2, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
    _install_kill_hook()
    self.directory = checkpoint_dir(workdir)
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    # orbax writes a checkpoint's metrics only when `best_fn` is set.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC],
        read_only=read_only, create=not read_only)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name, handler, save, restore in (
        ("state", ocp.StandardCheckpointHandler(), ocp.args.StandardSave,
         ocp.args.StandardRestore),
        ("config", ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore),
        (DATA_ITEM, ocp.JsonCheckpointHandler(), ocp.args.JsonSave,
         ocp.args.JsonRestore)):
      registry.add(name, save, handler)
      registry.add(name, restore, handler)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)

  def all_steps(self):
    return self.manager.all_steps()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The step with the highest validation top-1, else the latest."""
    scored = [(m[BEST_METRIC], s) for s in self.manager.all_steps()
              if (m := self.manager.metrics(s)) and BEST_METRIC in m]
    return max(scored)[1] if scored else self.latest_step()

  def save(self, step: int, state: state_lib.TrainState, data_iterator: Any,
           config: ml_collections.ConfigDict,
           metrics: Optional[Dict[str, float]] = None) -> None:
    """Saves (asynchronously; the arrays are copied before this returns).

    `data_iterator` is a `pipeline.BatchIterator` (its position is saved) or None.
    """
    items = dict(state=ocp.args.StandardSave(serialization.to_state_dict(state)),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iterator is not None:
      position = dict(json.loads(data_iterator.get_state()), batch_size=config.batch_size)
      items[DATA_ITEM] = ocp.args.JsonSave(position)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                      force=True)

  def saved_config(self, step: int) -> Dict[str, Any]:
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def check_compatible(self, step: int, abstract_state: state_lib.TrainState,
                       config: ml_collections.ConfigDict) -> None:
    """Raises `IncompatibleCheckpointError` (a ValueError) if checkpoint `step` cannot
    be restored into this state."""
    metadata = self.manager.item_metadata(step)["state"]
    saved = {k: tuple(v.shape) for k, v in
             traverse_util.flatten_dict(_as_dict(metadata), sep="/").items()}
    wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
        serialization.to_state_dict(abstract_state), sep="/").items()}
    if saved == wanted:
      return
    problems = [f"{k}: {saved.get(k, 'missing')} in the checkpoint, "
                f"{wanted.get(k, 'missing')} in the model"
                for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    old = self.saved_config(step)
    changed = [f"{k}: {v!r} in the checkpoint, {new!r} now" for k, v in
               sorted(traverse_util.flatten_dict(old.get("model", {}), sep=".").items())
               if (new := _lookup(config.model, k)) != v and not isinstance(v, list)]
    raise IncompatibleCheckpointError(
        f"checkpoint {self.directory}/{step} holds another model than the config "
        f"describes ({len(problems)} arrays differ, e.g. {problems[:3]}). Changed "
        f"model keys: {changed or 'none'}. Use a new --workdir, or the config the "
        "checkpoint was trained with.")

  def restore(self, step: int, abstract_state: state_lib.TrainState,
              config: ml_collections.ConfigDict,
              data_iterator: Any = None) -> state_lib.TrainState:
    """The state of checkpoint `step`; `data_iterator` is moved to its position.

    Raises:
      IncompatibleCheckpointError: the checkpoint holds another model.
    """
    self.check_compatible(step, abstract_state, config)
    target = serialization.to_state_dict(abstract_state)
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iterator is not None:
      items[DATA_ITEM] = ocp.args.JsonRestore()
    if data_iterator is not None and DATA_ITEM not in self.manager.item_metadata(step):
      del items[DATA_ITEM]  # a checkpoint from before `data_position`
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = serialization.from_state_dict(abstract_state, restored["state"])
    if data_iterator is not None:
      position = (restored[DATA_ITEM] if DATA_ITEM in items
                  else self._legacy_data_position(step, config))
      data_iterator.set_state(_data_state(position, config.batch_size, step))
    return state

  def _legacy_data_position(self, step: int, config) -> Dict[str, int]:
    """The position saved by grain's per-process handler (the same in every file)."""
    files = sorted((self.directory / str(step) / LEGACY_DATA_ITEM).glob("process_0-of-*"))
    if not files:
      raise FileNotFoundError(f"checkpoint {self.directory}/{step} has no data position "
                              f"({DATA_ITEM} or {LEGACY_DATA_ITEM}/process_0-of-N.json)")
    return dict(json.loads(files[0].read_text()), batch_size=config.batch_size)

  def restore_latest(self, abstract_state: state_lib.TrainState,
                     config: ml_collections.ConfigDict, data_iterator: Any = None
                     ) -> Optional[Tuple[state_lib.TrainState, int]]:
    """The newest checkpoint that can be restored, as `(state, step)`; None if none.

    Newer checkpoints that cannot be read are logged with their error and moved to
    `checkpoints_unreadable/`, so that the run can save those steps again.

    Raises:
      IncompatibleCheckpointError: a checkpoint holds another model.
      UnreadableCheckpointsError: there are checkpoints, and none can be read.
    """
    failures: List[Tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, config, data_iterator)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = f"{type(e).__name__}: {str(e)[:500]}"
        logging.warning("cannot restore checkpoint %s/%d (%s); trying an older one",
                        self.directory, step, error)
        failures.append((step, error))
        continue
      for bad, error in failures:
        self._set_aside(bad, error)
      return state, step
    if failures:
      raise UnreadableCheckpointsError(
          f"none of the checkpoints in {self.directory} can be restored: "
          + "; ".join(f"step {s}: {e}" for s, e in failures)
          + ". Repair or remove them (the run does not start from scratch over them).")
    return None

  def _set_aside(self, step: int, error: str) -> None:
    """Copies an unreadable checkpoint out of the manager's folder, then deletes it."""
    source = self.directory / str(step)
    target = self.directory.parent / "checkpoints_unreadable" / str(step)
    logging.warning("moving the unreadable checkpoint %s (%s) to %s", source, error, target)
    if jax.process_index() == 0:
      for folder, _, files in source.walk():
        destination = target / folder.relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
          (folder / name).copy(destination / name, overwrite=True)
    self.manager.delete(step)  # all processes meet here before any saves that step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _as_dict(metadata: Any) -> Any:
  """The nested dict of array metadata of a saved `state` item."""
  return dict(getattr(metadata, "tree", metadata))


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    if part not in config:
      return None
    config = config[part]
  return config


def _data_state(position: Dict[str, int], batch_size: int, step: int
                ) -> Dict[str, int]:
  """The iterator state for a saved data position, under this `batch_size`.

  The position is the next global batch; with another global batch size it is
  converted through the sample index (`next_batch * batch_size`) and a warning says
  that the batches differ from an uninterrupted run.
  """
  saved_batch_size = int(position.get("batch_size", batch_size))
  next_batch = int(position["next_batch"])
  if saved_batch_size == batch_size:
    return {"next_batch": next_batch}
  sample = next_batch * saved_batch_size
  logging.warning(
      "checkpoint step %d was trained with config.batch_size=%d, now %d: resuming the "
      "data at sample %d (batch %d); the batches differ from an uninterrupted run",
      step, saved_batch_size, batch_size, sample, sample // batch_size)
  return {"next_batch": sample // batch_size}


def restore_variables(config: ml_collections.ConfigDict, workdir: paths.PathLike,
                      step: Union[int, str] = "latest", mesh=None
                      ) -> Tuple[Dict[str, Any], int]:
  """The model variables of a checkpoint, for evaluation or inference.

  Args:
    config: the experiment config the checkpoint was trained with.
    workdir: the training run's directory.
    step: a step number, 'latest' or 'best' (highest validation top-1).
    mesh: where to place them (replicated); defaults to all devices.

  Returns:
    `({'params': ..., 'batch_stats': ...}, step)`, ready for
    `build_model(config).apply(variables, video, train=False)`.

  Raises:
    FileNotFoundError: no checkpoint in `workdir` (or not that step).
    IncompatibleCheckpointError: the checkpoint holds another model than `config`.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  ckpt, step = open_checkpoint(workdir, step)
  try:
    _, _, _, abstract = state_lib.build(config, mesh)
    restored = ckpt.restore(step, abstract, config)
  finally:
    ckpt.close()
  return restored.variables, step


def open_checkpoint(workdir: paths.PathLike, step: Union[int, str] = "latest"
                    ) -> Tuple[Checkpointer, int]:
  """A read-only `Checkpointer` of a run and the step `step` names; the caller closes it.

  Args:
    workdir: the training run's directory.
    step: a step number, 'latest' or 'best' (highest validation top-1).

  Raises:
    FileNotFoundError: no checkpoint in `workdir` (or not that step).
  """
  if not checkpoint_dir(workdir).exists():
    raise FileNotFoundError(
        f"no checkpoints in {workdir}: {checkpoint_dir(workdir)} does not exist (is it "
        f"the directory of a training run?)")
  ckpt = Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  chosen = {"latest": ckpt.latest_step, "best": ckpt.best_step}.get(step, lambda: step)()
  if chosen is None or chosen not in steps:
    ckpt.close()
    raise FileNotFoundError(
        f"no checkpoint {'' if chosen is None else chosen} in {ckpt.directory} "
        f"(saved steps: {sorted(steps)})")
  return ckpt, int(chosen)
