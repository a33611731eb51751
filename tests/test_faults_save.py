"""Kills inside a checkpoint save: a restart resumes from the newest complete one.

A small process (this file run as a script) saves a tiny train state at steps 1, 2,
3, ... through `checkpoint.Checkpointer` (the values and data position of step s are
s) and is killed (SIGKILL, the test hook `GTA_JAX_TEST_KILL_IN_SAVE`) at one of
orbax's phases of its third save, from its start to the deletion of the oldest
checkpoint. Then, as a resumed run does, the test restores the newest checkpoint
that can be read: it must be step 2 when the kill came before step 3 was committed
and step 3 after, hold exactly that step's values and data position (nothing
half-written is restored or lost beyond one checkpoint interval), and the run must
be able to save on over what the kill left behind. Ten phases, locally and in a
bucket: 20 trials. `train.py` itself is killed inside a save and resumed exactly in
test_train_e2e.py (locally and in the bucket).
"""

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from gta_jax.training import checkpoint
from gta_jax.training import state as state_lib

PHASES = (  # orbax's event, and whether the killed save is committed when it fires
    ("/jax/orbax/write/async/start", False),  # the save begins
    ("/jax/orbax/write/background_directory_creation_secs", False),  # an item's folder
    ("/jax/orbax/write/async/blocking_duration_secs", False),  # arrays copied to host
    ("/jax/orbax/write/background_meta_write_secs", False),  # metadata written
    ("/jax/orbax/write/background_ts_duration_secs", False),  # arrays written
    ("/jax/orbax/write/background_item_finalize_secs", False),  # an item finalised
    ("/jax/orbax/write/background_ocdbt_merge_secs", False),  # array files merged
    ("/jax/orbax/write/background_finalize_secs", True),  # renamed / commit_success.txt
    ("/jax/orbax/write/success", True),
    ("/jax/checkpoint/write/remove_steps_duration_secs", True),  # step 1 deleted
)
KILLED_SAVE = 3  # steps 1 and 2 are complete when it begins; keep=2 then deletes step 1
CONFIG = ml_collections.ConfigDict({"batch_size": 4, "model": {"width": 8}})


def state_at(step: int) -> state_lib.TrainState:
  """The train state the saver saves at `step`: every value is `step`."""
  full = lambda *shape: np.full(shape, step, np.float32)
  return state_lib.TrainState(
      step=np.int32(step), params={"conv": {"kernel": full(3, 3, 8, 8)}, "fc": full(64)},
      batch_stats={"mean": full(8)}, opt_state={"momentum": full(64)},
      lr_scale=np.float32(1), plateau_best=np.float32(-1), plateau_count=np.int32(0))


class Position:
  """A stand-in for the data iterator: its position is the next batch."""

  def __init__(self, next_batch: int = 0):
    self.next_batch = next_batch

  def get_state(self) -> str:
    return json.dumps({"next_batch": self.next_batch})

  def set_state(self, state) -> None:
    self.next_batch = state["next_batch"]


def save_steps(workdir: str, steps) -> None:
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  for step in steps:
    ckpt.save(step, state_at(step), Position(step), CONFIG)
  ckpt.wait()
  ckpt.close()


def kill_during_save(workdir: str, event: str, env) -> int:
  """Runs the saver until the hook kills it at `event` of save 3; its exit status."""
  env = dict(env, JAX_PLATFORMS="cpu",
             **{checkpoint.KILL_HOOK: f"{event}@{KILLED_SAVE}"})
  result = subprocess.run([sys.executable, __file__, workdir], env=env, timeout=300,
                          capture_output=True, text=True, check=False)
  return result.returncode, result.stderr[-3000:]


def check_resume(workdir: str, committed: bool) -> int:
  """Restores as a resumed run does, checks what it got, saves on; returns the step."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device),
      state_at(0))
  want = KILLED_SAVE if committed else KILLED_SAVE - 1
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  position = Position()
  state, step = ckpt.restore_latest(abstract, CONFIG, position)
  assert step == want and position.next_batch == want
  for got, saved in zip(jax.tree.leaves(state), jax.tree.leaves(state_at(want))):
    np.testing.assert_array_equal(got, saved)
  assert not checkpoint.checkpoint_dir(workdir).parent.joinpath(
      "checkpoints_unreadable").exists(), "a complete checkpoint was set aside"
  # The resumed run saves its next checkpoint over whatever the kill left.
  ckpt.save(want + 1, state_at(want + 1), Position(want + 1), CONFIG)
  ckpt.wait()
  ckpt.close()
  assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == want + 1
  return step


def run_trials(root: str, env) -> None:
  workdirs = [f"{root}/{i}" for i in range(len(PHASES))]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    killed = list(pool.map(lambda a: kill_during_save(a[0], a[1][0], env),
                           zip(workdirs, PHASES)))
  for (event, committed), workdir, (status, stderr) in zip(PHASES, workdirs, killed):
    assert status == -signal.SIGKILL, f"not killed at {event}: {status}\n{stderr}"
    check_resume(workdir, committed)


def test_kill_during_a_local_save_resumes_from_the_newest_complete(tmp_path):
  run_trials(str(tmp_path), os.environ)


def test_kill_during_a_bucket_save_resumes_from_the_newest_complete(bucket):
  run_trials("gs://bucket/kill_during_save", os.environ)


@pytest.fixture
def kill_hook(monkeypatch):
  """Installs the hook afresh from `kill_hook(value)`; the listeners it registers and
  the kills it sends, recorded instead."""
  listeners, kills = [], []
  monkeypatch.setattr(jax.monitoring, "register_event_listener", listeners.append)
  monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener",
                      listeners.append)
  monkeypatch.setattr(checkpoint.os, "kill", lambda pid, sig: kills.append(sig))

  def install(value):
    monkeypatch.setattr(checkpoint._install_kill_hook, "done", False, raising=False)  # pylint: disable=protected-access
    monkeypatch.setenv(checkpoint.KILL_HOOK, value)
    checkpoint._install_kill_hook()  # pylint: disable=protected-access
    return listeners, kills

  return install


@pytest.mark.parametrize("value", ["abc", "/jax/orbax/write/success@0",
                                   "/jax/orbax/write/success@two", "@3"])
def test_a_bad_kill_hook_is_an_error_naming_the_variable(kill_hook, value):
  with pytest.raises(ValueError, match=f"{checkpoint.KILL_HOOK}='{value}': expected"):
    kill_hook(value)


def test_the_kill_hook_warns_and_kills_at_its_event_of_its_save(kill_hook, caplog):
  event = "/jax/orbax/write/success"
  with caplog.at_level(logging.WARNING):
    listeners, kills = kill_hook(f"{event}@2")
  assert f"{checkpoint.KILL_HOOK}={event}@2: this process kills itself" in caplog.text
  [listener, _] = listeners
  for save in (1, 2):
    listener(PHASES[0][0])  # a save begins
    assert not kills
    listener(event)
    assert kills == ([signal.SIGKILL] if save == 2 else [])


if __name__ == "__main__":
  save_steps(sys.argv[1], range(1, KILLED_SAVE + 2))  # killed in save 3 (exits -9)
