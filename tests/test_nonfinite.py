"""Non-finite training (`config.nonfinite`): stop with one line, or roll back.

A learning-rate spike makes the loss of a real run non-finite: under 'stop' the run
ends with a one-line error naming the step, the metric and the newest checkpoint,
which is finite. Planted non-finite steps (tests/nonfinite_driver.py: the steps on
global batches 4 and 9) exercise 'rollback' on 1 device and on 2 processes: the first
is rolled back to checkpoint 4 with 2 batches skipped, the second (after the one
rollback allowed) stops the run; both processes take the same decisions as the
single one, and their losses match.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import gcs_emulator
from test_train_e2e import REPO, command, environment, rows, saved_steps

pytestmark = pytest.mark.slow

DRIVER = os.path.join(REPO, "tests", "nonfinite_driver.py")
PLANTED = "4,9"  # global batches; step s trains on batch s - 1 until the rollback
ROLLBACK = ["--config.nonfinite=rollback", "--config.nonfinite_skip_batches=2",
            "--config.nonfinite_max_rollbacks=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def planted_command(workdir, data_dir, *extra):
  argv = command("train.py", workdir, data_dir, *ROLLBACK, *extra)
  argv[1] = DRIVER
  return argv


def finished(processes):
  """Waits for `processes`; their stderr."""
  return [p.communicate(timeout=600)[1] for p in processes]


def error_line(stderr):
  return stderr.strip().splitlines()[-1]


def checkpoint_state(workdir, step):
  """A saved checkpoint's state (on this process's one device, whatever devices
  saved it) and data position."""
  folder = os.path.join(workdir, "checkpoints", str(step))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.join(folder, "state"))
    tree = getattr(metadata, "item_metadata", metadata)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        dict(getattr(tree, "tree", tree)))
    state = checkpointer.restore(os.path.join(folder, "state"), target)
  with open(os.path.join(folder, "data_position", "metadata")) as f:
    return state, json.load(f)


def assert_finite(tree):
  leaves = jax.tree.leaves(tree)
  assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)


def run_planted(workdir, data_dir, processes):
  """Runs the planted scenario on 1 process (1 device) or 2 (2 devices each)."""
  env = environment(1 if processes == 1 else 2, GTA_JAX_PLANT_NONFINITE=PLANTED)
  flags = [[]]
  if processes == 2:
    address = f"127.0.0.1:{gcs_emulator.free_port()}"
    flags = [[f"--coordinator_address={address}", "--num_processes=2",
              f"--process_id={i}"] for i in range(2)]
  started = [subprocess.Popen(planted_command(workdir, data_dir, *f), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in flags]
  errors = finished(started)
  return [p.returncode for p in started], errors


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_dir):
  """The planted scenario on 1 and on 2 processes: {processes: (workdir, exit
  statuses, stderrs)}."""
  runs = {}
  for processes in (1, 2):
    workdir = tmp_path_factory.mktemp(f"planted_{processes}")
    runs[processes] = (workdir, *run_planted(workdir, data_dir, processes))
  return runs


@pytest.mark.parametrize("processes", [1, 2])
def test_rollback_then_stop_after_the_allowed_rollbacks(planted, processes):
  workdir, codes, errors = planted[processes]
  # The second planted batch (9, step 8 after the rollback) exhausts the rollbacks:
  # every process stops with the same one-line error naming checkpoint 6.
  want = (f"non-finite loss (nan) at step 8; the newest finite checkpoint is "
          f"{workdir}/checkpoints/6. Stopped after 1 rollbacks")
  for code, stderr in zip(codes, errors):
    assert code == 1, stderr[-5000:]
    assert want in error_line(stderr), stderr[-5000:]
    assert "Traceback" not in stderr, stderr[-5000:]
  # The first (batch 4, step 5) rolled back to checkpoint 4 and skipped batches 4, 5.
  rollback = rows(workdir, "rollback")
  assert list(rollback) == [5]
  assert rollback[5]["metric"] == "loss"
  assert (rollback[5]["restored_step"], rollback[5]["data_position"],
          rollback[5]["skipped_batches"]) == (4, 4, 2)
  # Nothing non-finite was saved; step 6 was trained on batch 7: position 8 after it.
  assert saved_steps(workdir) == [4, 6]
  for step, position in ((4, 4), (6, 8)):
    state, data = checkpoint_state(workdir, step)
    assert data["next_batch"] == position
    assert_finite(state["params"])
  train = rows(workdir, "train")
  assert max(train) == 7 and all(np.isfinite(train[s]["loss"]) for s in range(1, 8))


def test_two_processes_take_the_decisions_of_one(planted):
  """The 2-process run logs the 1-process run's steps, losses (within float
  reduction-order noise) and rollback."""
  (one, _, _), (two, _, _) = planted[1], planted[2]
  want, got = rows(one, "train"), rows(two, "train")
  assert sorted(got) == sorted(want)
  for step in want:
    assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-3), step
  assert rows(two, "rollback") == rows(one, "rollback")


def test_lr_spike_stops_with_one_line_naming_the_newest_checkpoint(data_dir, tmp_path):
  """The by-hand case (`--config.optim.base_lr=1e9`), with grain input workers."""
  result = subprocess.run(
      command("train.py", tmp_path, data_dir, "--config.optim.base_lr=1e30",
              "--config.optim.grad_clip_norm=0", "--config.checkpoint_every_steps=1",
              "--config.data.num_workers=1"),
      env=environment(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stderr[-5000:]
  line = error_line(result.stderr)
  assert line.startswith("train: NonFiniteLossError: non-finite "), result.stderr[-5000:]
  step = int(line.split(" at step ")[1].split(";")[0])
  saved = saved_steps(tmp_path)
  assert saved and max(saved) < step
  assert f"the newest finite checkpoint is {tmp_path}/checkpoints/{max(saved)}." in line
  for s in saved:
    assert_finite(checkpoint_state(tmp_path, s)[0]["params"])
  assert "Traceback" not in result.stderr
  assert "leaked shared_memory" not in result.stderr, result.stderr[-3000:]
