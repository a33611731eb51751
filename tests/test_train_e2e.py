"""End-to-end runs of `train.py` and `eval.py` in subprocesses on the embedded data.

One tiny TSM run on one device is the reference; the other runs must reproduce it:
after SIGTERM and SIGKILL restarts; on 2 processes x 2 devices (jax.distributed on
127.0.0.1 with gloo) stopped by a SIGTERM to one process, then resumed on 1 process
of 4 devices and of 1 device, and the reverse (a 1-device checkpoint resumed on 2
processes); with the workdir and data in a bucket (a local GCS emulator).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import gcs_emulator
from gta_jax.data import pipeline
from gta_jax.training import checkpoint
from gta_jax.training import sharding
from gta_jax.training import state as state_lib

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic_tsm.py")
TOTAL_STEPS = 10
NUM_VAL_VIDEOS = 20  # 2 per class, 10 classes
TINY = [
    "--config.data.synthetic.train_per_class=4", "--config.data.synthetic.val_per_class=2",
    "--config.data.num_frames=4", "--config.data.num_workers=0",
    "--config.batch_size=8", "--config.eval.batch_size=8", "--config.eval.num_clips=2",
    f"--config.total_steps={TOTAL_STEPS}", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0",
    # Longer than the run: clipped to 9 steps (a smoke run's warm-up).
    "--config.optim.warmup_steps=20",
    # Plain SGD at a gentle lr, whatever the recipe: float reduction orders differ
    # across device counts, and a large lr amplifies those 1e-7 differences.
    "--config.optim.name=sgd", "--config.optim.base_lr=0.02",
]


def command(script, workdir, data_dir, *extra):
  return [sys.executable, os.path.join(REPO, script), "--config", CONFIG,
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *TINY, *extra]


def environment(devices=1, **extra):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def run(script, workdir, data_dir, *extra, devices=1, expect_ok=True, env=None, cwd=None):
  result = subprocess.run(command(script, workdir, data_dir, *extra),
                          env=env or environment(devices), capture_output=True, text=True,
                          timeout=600, check=False, cwd=cwd)
  if expect_ok:
    assert result.returncode == 0, result.stderr[-5000:]
  return result


def rows(workdir, kind):
  """step -> the last logged row of that kind (local or bucket workdir)."""
  out = {}
  for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["kind"] == kind:
      out[row["step"]] = row
  return out


def saved_steps(workdir):
  """The committed checkpoints (orbax marks them, locally and in a bucket)."""
  directory = epath.Path(workdir, "checkpoints")
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists())


def assert_same_curve(workdir, reference, tol):
  got, want = rows(workdir, "train"), rows(reference, "train")
  assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
  for step in want:
    assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=tol), step
  got_eval = rows(workdir, "eval")[TOTAL_STEPS]
  want_eval = rows(reference, "eval")[TOTAL_STEPS]
  assert got_eval["num_videos"] == NUM_VAL_VIDEOS
  assert got_eval["loss"] == pytest.approx(want_eval["loss"], abs=tol)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("reference")
  result = run("train.py", workdir, data_dir)
  return workdir, result


def test_train_then_eval(reference, data_dir):
  workdir, result = reference
  assert "final val top-1 " in result.stdout
  train = rows(workdir, "train")
  assert sorted(train) == list(range(1, TOTAL_STEPS + 1))
  for row in train.values():
    assert {"loss", "lr", "examples_per_sec"} <= set(row)
  assert train[1]["lr"] == pytest.approx(0.0)  # warm-up from 0
  val = rows(workdir, "eval")[TOTAL_STEPS]
  assert val["num_videos"] == NUM_VAL_VIDEOS
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  # The last 2 checkpoints are kept (the best, the final one, is among them).
  assert saved_steps(workdir) == [TOTAL_STEPS - 2, TOTAL_STEPS]

  result = run("eval.py", workdir, data_dir)
  assert "top-1" in result.stdout
  summary = json.load(open(os.path.join(workdir, "eval", f"val_step{TOTAL_STEPS}.json")))
  for key in ("top1", "top5", "mean_class_accuracy", "loss", "num_videos", "step"):
    assert key in summary
  assert summary["num_videos"] == NUM_VAL_VIDEOS
  assert summary["top1"] == pytest.approx(val["top1"])
  assert summary["loss"] == pytest.approx(val["loss"], abs=1e-6)
  stem = os.path.join(workdir, "eval", f"val_step{TOTAL_STEPS}")
  with open(stem + "_predictions.csv") as f:
    assert len(f.readlines()) == NUM_VAL_VIDEOS + 1
  assert os.path.getsize(stem + "_confusion.png") > 1000


def wait_for_checkpoint(process, workdir, after):
  """Polls until a checkpoint past `after` is committed; returns its step."""
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [s for s in saved_steps(workdir) if s > after]
    if done:
      return done[0]
    assert process.poll() is None, process.communicate()[1][-5000:]
    time.sleep(0.02)
  raise AssertionError("no checkpoint within 300 s")


def test_sigterm_and_sigkill_restarts_reproduce_the_run(reference, data_dir, tmp_path):
  """SIGTERM saves and exits 0; after a SIGKILL inside a save the restart resumes
  exactly, from the checkpoint before the half-written one."""
  ref_dir, _ = reference
  workdir = tmp_path / "restarted"
  argv = command("train.py", workdir, data_dir)

  process = subprocess.Popen(argv, env=environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  wait_for_checkpoint(process, workdir, 0)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-5000:]
  stopped = max(saved_steps(workdir))
  assert stopped < TOTAL_STEPS, "the run ended before SIGTERM arrived"
  assert max(rows(workdir, "train")) == stopped  # it saved the step it stopped at

  # Killed in its first save once the arrays are written, before orbax commits it
  # (the test hook of gta_jax/training/checkpoint.py; more phases: test_faults_save.py).
  killed = run("train.py", workdir, data_dir, expect_ok=False, env=environment(**{
      checkpoint.KILL_HOOK: "/jax/orbax/write/background_ts_duration_secs@1"}))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-5000:]
  assert max(saved_steps(workdir)) == stopped
  half_written = [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
  assert half_written, os.listdir(workdir / "checkpoints")

  result = run("train.py", workdir, data_dir)
  assert f"resumed from {workdir}/checkpoints/{stopped}" in result.stderr
  assert_same_curve(workdir, ref_dir, tol=1e-5)


def start_two_processes(workdir, data_dir, devices_per_process=2):
  address = f"127.0.0.1:{gcs_emulator.free_port()}"
  return [subprocess.Popen(command("train.py", workdir, data_dir,
                                   f"--coordinator_address={address}",
                                   "--num_processes=2", f"--process_id={i}"),
                           env=environment(devices_per_process), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def finish(processes):
  for p in processes:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-5000:]


def copy_run(source, target, step):
  """A copy of a run's workdir as it was when checkpoint `step` was its newest."""
  shutil.copytree(source, target)
  for later in saved_steps(target):
    if later > step:
      shutil.rmtree(os.path.join(target, "checkpoints", str(later)))
  lines = open(os.path.join(target, "metrics.jsonl")).read().splitlines()
  with open(os.path.join(target, "metrics.jsonl"), "w") as f:
    f.writelines(l + "\n" for l in lines if json.loads(l)["step"] <= step)
  return target


@pytest.fixture(scope="module")
def preempted_two_processes(tmp_path_factory, data_dir):
  """2 processes x 2 devices; SIGTERM to process 1 only, after the first checkpoint.

  Returns the workdir and the step both stopped at.
  """
  workdir = tmp_path_factory.mktemp("two_processes")
  processes = start_two_processes(workdir, data_dir)
  wait_for_checkpoint(processes[0], workdir, 0)
  processes[1].send_signal(signal.SIGTERM)
  finish(processes)  # both exit 0
  stopped = max(saved_steps(workdir))
  assert stopped < TOTAL_STEPS, "the run ended before SIGTERM arrived"
  return workdir, stopped


def test_sigterm_to_one_of_two_processes_saves_one_step_everywhere(
    reference, preempted_two_processes):
  """Both processes stopped at the step of the last checkpoint, the one the
  preemption sync point named (process 0 logs and saves for both)."""
  workdir, stopped = preempted_two_processes
  assert max(rows(workdir, "train")) == stopped
  train, want = rows(workdir, "train"), rows(reference[0], "train")
  for step in train:
    assert train[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-3), step


@pytest.mark.parametrize("devices", [4, 1])
def test_two_process_checkpoint_resumes_on_one_process(
    reference, preempted_two_processes, data_dir, tmp_path, devices):
  """The data position is global: 2 x 2 devices -> 1 x 4 and 1 x 1, same curve. Four
  devices also round the eval batch (6 -> 8)."""
  workdir, stopped = preempted_two_processes
  resumed = copy_run(workdir, tmp_path / "resumed", stopped)
  result = run("train.py", resumed, data_dir, "--config.eval.batch_size=6",
               devices=devices)
  assert f"resumed from {resumed}/checkpoints/{stopped}" in result.stderr
  assert_same_curve(resumed, reference[0], tol=1e-3)


def test_one_process_checkpoint_resumes_on_two_processes(reference, data_dir, tmp_path):
  ref_dir, _ = reference
  resumed = copy_run(ref_dir, tmp_path / "resumed", TOTAL_STEPS - 2)
  finish(start_two_processes(resumed, data_dir))
  assert_same_curve(resumed, ref_dir, tol=1e-3)


@pytest.mark.parametrize("extra,devices,match", [
    (["--config.optim.nmae=sgd"], 1, "nmae"),
    (["--config.batch_size=6"], 4, "config.batch_size=6 must be a positive multiple"),
])
def test_bad_config_gives_a_clear_error(extra, devices, match, data_dir, tmp_path):
  """The CLI reports unknown keys and bad values (more values: test_train_config.py)."""
  result = run("train.py", tmp_path, data_dir, *extra, devices=devices, expect_ok=False)
  assert result.returncode != 0
  assert match in result.stderr, result.stderr[-3000:]


def test_checkpoint_of_another_model_is_refused(reference, data_dir):
  workdir, _ = reference
  result = run("eval.py", workdir, data_dir, "--config.model.width=16", expect_ok=False)
  assert result.returncode != 0
  assert "holds another model" in result.stderr and "width" in result.stderr


def tiny_config(data_dir):
  """The config the CLI runs build: configs/synthetic_tsm.py with TINY's overrides."""
  import synthetic_tsm  # pylint: disable=g-import-not-at-top
  config = synthetic_tsm.get_config()
  for flag in TINY + [f"--config.data.data_dir={data_dir}"]:
    key, value = flag[len("--config."):].split("=", 1)
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = type(node[name])(value)
  return config


@pytest.fixture
def restore_target(data_dir):
  """What the train loop restores into: the abstract state and a data iterator."""
  config = tiny_config(data_dir)
  _, _, _, abstract = state_lib.build(config, sharding.make_mesh())
  iterator = iter(pipeline.make_train_loader(config, seed=config.seed, process_index=0,
                                             process_count=1))
  yield config, abstract, iterator
  iterator.close()


def truncate(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state", "_sharding")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(
    reference, restore_target, tmp_path, caplog):
  config, abstract, iterator = restore_target
  workdir = copy_run(reference[0], tmp_path / "run", TOTAL_STEPS)
  truncate(workdir, TOTAL_STEPS)
  ckpt = checkpoint.Checkpointer(workdir)
  state, step = ckpt.restore_latest(abstract, config, iterator)
  ckpt.close()
  assert step == TOTAL_STEPS - 2 and int(state.step) == step
  assert json.loads(iterator.get_state()) == {"next_batch": step}
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert f"cannot restore checkpoint {workdir}/checkpoints/{TOTAL_STEPS}" in warned
  # The unreadable one is set aside, so that the resumed run can save that step again.
  assert saved_steps(workdir) == [step]
  aside = os.path.join(workdir, "checkpoints_unreadable", str(TOTAL_STEPS))
  with open(os.path.join(aside, "state", "_sharding"), "rb") as f:
    truncated = f.read()
  assert truncated and os.path.getsize(os.path.join(
      reference[0], "checkpoints", str(TOTAL_STEPS), "state", "_sharding")) // 2 == len(truncated)
  want = checkpoint.Checkpointer(reference[0], read_only=True).restore(step, abstract,
                                                                       config)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(a, b)


def test_no_readable_checkpoint_is_an_error_naming_them(reference, restore_target,
                                                        tmp_path):
  config, abstract, iterator = restore_target
  workdir = copy_run(reference[0], tmp_path / "run", TOTAL_STEPS)
  for step in saved_steps(workdir):
    truncate(workdir, step)
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(checkpoint.UnreadableCheckpointsError,
                     match=rf"{workdir}/checkpoints.*step 10: .*step 8: "):
    ckpt.restore_latest(abstract, config, iterator)
  ckpt.close()
  assert saved_steps(workdir) == [TOTAL_STEPS - 2, TOTAL_STEPS]  # nothing deleted


# A bucket on a bad day: 1 request in 10 fails (answered 429 or 503, or its connection
# dropped mid-body), each one is 2 ms late; the clients retry quickly (gta_jax.retries).
BUCKET_FAULTS = dict(error_rate=0.06, drop_rate=0.04, latency_s=0.002)
FAST_RETRIES = dict(GTA_JAX_RETRY_INITIAL_S="0.02", GTA_JAX_RETRY_MAX_S="0.5")


def test_bucket_run_matches_the_local_one(reference, bucket, tmp_path):
  """Prepare, train (SIGKILL inside the second save, resume), validate during
  training and evaluate with the data and workdir in gs://bucket, while the bucket
  fails 10% of the requests: the same weights and results as the local run, and
  every output is an object in the bucket."""
  ref_dir, _ = reference
  workdir, data = "gs://bucket/run", "gs://bucket/tfds"
  argv = ("--config.eval_every_steps=4", "--config.eval.during_training.max_videos=10")
  env = environment(**bucket.env, **FAST_RETRIES)

  def committed(_):
    """The committed checkpoints, from the store: listing them through gcsfs here
    would leave a stale listing in its cache for the checks at the end."""
    return sorted(int(n.split("/")[2]) for n in bucket.names("bucket", "run/checkpoints/")
                  if n.count("/") == 3 and n.endswith("/commit_success.txt"))

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  with bucket.faulty(**BUCKET_FAULTS) as faults:
    # Killed in the save of step 4 once its array files are merged: all of its
    # objects but commit_success.txt are in the bucket.
    killed = run("train.py", workdir, data, *argv, expect_ok=False, cwd=cwd, env=dict(
        env, **{checkpoint.KILL_HOOK: "/jax/orbax/write/background_ocdbt_merge_secs@2"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-5000:]
    assert committed(workdir) == [2] and bucket.names("bucket", "run/checkpoints/4/")
    resumed = run("train.py", workdir, data, *argv, env=env, cwd=cwd)
    assert f"resumed from {workdir}/checkpoints/2" in resumed.stderr
    evaluated = run("eval.py", workdir, data, env=env, cwd=cwd)
  assert not os.listdir(cwd), "something was written to a local './gs:' folder"
  print(f"bucket faults: {dict(faults.counts)}; by client: {dict(faults.by_client)}")
  assert faults.faulted >= 0.05 * faults.counts["requests"] > 20, faults.counts
  for result in (resumed, evaluated):  # each process logs what it retried
    assert "bucket requests retried in this process" in result.stderr

  assert_same_curve(workdir, ref_dir, tol=1e-5)
  got = ocp.StandardCheckpointer().restore(epath.Path(workdir, "checkpoints", "10", "state"))
  want = ocp.StandardCheckpointer().restore(os.path.join(ref_dir, "checkpoints", "10",
                                                         "state"))
  for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # Validation during training: the cheap protocol, logged apart from the full one.
  quick, full = rows(workdir, "eval_during_training"), rows(workdir, "eval")
  assert sorted(quick) == [4, 8] and sorted(full) == [TOTAL_STEPS]
  assert {(r["num_views"], r["num_videos"]) for r in quick.values()} == {(1, 10)}
  assert (full[TOTAL_STEPS]["num_views"], full[TOTAL_STEPS]["num_videos"]) == (
      2, NUM_VAL_VIDEOS)

  stem = epath.Path(workdir, "eval", f"val_step{TOTAL_STEPS}")
  summary = json.loads(epath.Path(f"{stem}.json").read_text())
  assert summary["top1"] == rows(ref_dir, "eval")[TOTAL_STEPS]["top1"]
  assert summary["loss"] == pytest.approx(rows(ref_dir, "eval")[TOTAL_STEPS]["loss"],
                                          abs=1e-6)
  assert len(epath.Path(f"{stem}_predictions.csv").read_text().splitlines()) == (
      NUM_VAL_VIDEOS + 1)
  assert epath.Path(f"{stem}_confusion.csv").exists()
  assert epath.Path(f"{stem}_confusion.png").stat().length > 1000
  assert list(epath.Path(workdir, "tensorboard").iterdir())
  assert list(epath.Path(data).glob("synthetic_motion/*/*/dataset_info.json"))
