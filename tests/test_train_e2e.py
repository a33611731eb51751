"""End-to-end runs of `train.py` and `eval.py` in subprocesses on the embedded data.

One tiny TSM run on one device is the reference; the other runs must reproduce it:
after SIGTERM and SIGKILL restarts, on 4 devices, and on 2 processes x 2 devices
(jax.distributed on 127.0.0.1 with gloo).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic_tsm.py")
TOTAL_STEPS = 10
NUM_VAL_VIDEOS = 20  # 2 per class, 10 classes
TINY = [
    "--config.data.synthetic.train_per_class=4", "--config.data.synthetic.val_per_class=2",
    "--config.data.num_frames=4", "--config.data.num_workers=0",
    "--config.batch_size=8", "--config.eval.batch_size=8",
    f"--config.total_steps={TOTAL_STEPS}", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0",
    "--config.optim.warmup_steps=2",
    # Plain SGD at a gentle lr, whatever the recipe: float reduction orders differ
    # across device counts, and a large lr amplifies those 1e-7 differences.
    "--config.optim.name=sgd", "--config.optim.base_lr=0.02",
]


def command(script, workdir, data_dir, *extra):
  return [sys.executable, os.path.join(REPO, script), "--config", CONFIG,
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *TINY, *extra]


def environment(devices=1):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run(script, workdir, data_dir, *extra, devices=1, expect_ok=True):
  result = subprocess.run(command(script, workdir, data_dir, *extra),
                          env=environment(devices), capture_output=True, text=True,
                          timeout=600, check=False)
  if expect_ok:
    assert result.returncode == 0, result.stderr[-5000:]
  return result


def rows(workdir, kind):
  """step -> the last logged row of that kind."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row["kind"] == kind:
        out[row["step"]] = row
  return out


def saved_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


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
  assert "final val top-1:" in result.stdout
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
  """SIGTERM saves and exits 0; after a SIGKILL the restart resumes exactly."""
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

  process = subprocess.Popen(argv, env=environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  wait_for_checkpoint(process, workdir, stopped)
  process.kill()
  process.communicate(timeout=60)
  assert max(saved_steps(workdir)) < TOTAL_STEPS, "the run ended before SIGKILL arrived"

  run("train.py", workdir, data_dir)
  assert_same_curve(workdir, ref_dir, tol=1e-5)


def test_four_devices_match_one(reference, data_dir, tmp_path):
  ref_dir, _ = reference
  run("train.py", tmp_path, data_dir, devices=4)
  assert_same_curve(tmp_path, ref_dir, tol=1e-3)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(workdir, data_dir, devices_per_process):
  address = f"127.0.0.1:{free_port()}"
  processes = [
      subprocess.Popen(command("train.py", workdir, data_dir,
                               f"--coordinator_address={address}", "--num_processes=2",
                               f"--process_id={i}"),
                       env=environment(devices_per_process), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in processes:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-5000:]


def test_two_processes_of_two_devices_match_one_device(reference, data_dir, tmp_path):
  """jax.distributed on 127.0.0.1 (gloo): each process feeds its rows of the global
  batch, which is the same for any process count, so the curve is the 1-device one."""
  ref_dir, _ = reference
  run_two_processes(tmp_path, data_dir, 2)
  assert_same_curve(tmp_path, ref_dir, tol=1e-3)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  result = run("train.py", tmp_path, data_dir, "--config.optim.base_lr=1e30",
               "--config.optim.grad_clip_norm=0", "--config.checkpoint_every_steps=1",
               expect_ok=False)
  assert result.returncode != 0
  message = [l for l in result.stderr.splitlines() if "NonFiniteLossError" in l]
  assert message, result.stderr[-3000:]
  bad_step = int(message[-1].split(" at step ")[1].split(":")[0])
  assert saved_steps(tmp_path) and max(saved_steps(tmp_path)) == bad_step - 1


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
