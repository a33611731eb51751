"""The package as `pip install` leaves it: train, evaluate and predict by recipe name.

The wheel is built from the working tree as `pip install git+URL` builds it (an
isolated build of a copy of the files the build reads; pip fetches setuptools from
the package index, or its cache, as for `pip install -e .`), installed without its
dependencies into a fresh virtual environment outside the repository, made with
the base interpreter. The dependencies (JAX and the rest, ~1 GB) come from this
test's own environment through a `.pth` line, written after the install so that pip
sees an empty environment; that line adds the folder to `sys.path` without running
its `.pth` files, so the editable install of the repository stays out. The commands
run from a folder outside the repository, without PYTHONPATH.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from gta_jax.data.builders import synthetic_motion

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_FILES = ("pyproject.toml", "requirements.txt", "README.md")
TOTAL_STEPS = 2


def call(command, timeout=300, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False, **kwargs)
  assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
  return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """The fresh environment: dict(python=, bin=, venv=, env= (for its commands), cwd=,
  seconds= (of each step))."""
  root = tmp_path_factory.mktemp("installed")
  seconds = {}
  start = time.perf_counter()
  source = root / "source"
  shutil.copytree(os.path.join(REPO, "gta_jax"), source / "gta_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in BUILD_FILES:
    shutil.copy(os.path.join(REPO, name), source / name)
  call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "wheels"),
        str(source)])
  (wheel,) = (root / "wheels").iterdir()
  seconds["wheel"] = time.perf_counter() - start

  start = time.perf_counter()
  venv = root / "venv"
  call([sys._base_executable, "-m", "venv", "--without-pip", str(venv)])  # pylint: disable=protected-access
  python = str(venv / "bin" / "python")
  call([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
        "--no-index", str(wheel)])
  purelib = call([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                 ).stdout.strip()
  with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  seconds["venv"] = time.perf_counter() - start

  cwd = root / "elsewhere"
  cwd.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  return dict(python=python, bin=venv / "bin", venv=str(venv), env=env, cwd=str(cwd),
              seconds=seconds)


def run(installed, *args, timeout=300):
  return call(list(args), timeout=timeout, env=installed["env"], cwd=installed["cwd"])


def test_gta_jax_comes_from_the_wheel(installed):
  probe = ("import json, sys, gta_jax, gta_jax.recipes; print(json.dumps(dict("
           "file=gta_jax.__file__, recipes=gta_jax.recipes.DIRECTORY, path=sys.path)))")
  found = json.loads(run(installed, installed["python"], "-c", probe).stdout)
  assert found["file"].startswith(installed["venv"] + os.sep), found["file"]
  assert found["recipes"].startswith(installed["venv"] + os.sep)
  assert os.path.exists(os.path.join(found["recipes"], "synthetic_gta.py"))
  assert REPO not in found["path"]
  assert not any(os.path.exists(os.path.join(installed["cwd"], p, "gta_jax"))
                 for p in found["path"] if not p.startswith(installed["venv"])), found["path"]

  listing = run(installed, installed["python"], "-m", "gta_jax.recipes").stdout
  assert any(line.startswith("synthetic_gta ") for line in listing.splitlines())

  # The console scripts, through cli.run's re-execution of their own command line
  # (absl's --help exits with status 1).
  for script, usage in (("gta-jax-train", "Trains a model"),
                        ("gta-jax-eval", "Evaluates a checkpoint")):
    result = subprocess.run([str(installed["bin"] / script), "--help"], capture_output=True,
                            text=True, timeout=120, check=False, env=installed["env"],
                            cwd=installed["cwd"])
    out = result.stdout
    assert result.returncode == 1 and out.startswith(usage), result.stderr[-3000:]
    assert "--config:" in out and "--workdir:" in out, out


def test_train_eval_predict_by_recipe_name(installed, tmp_path):
  workdir, data = tmp_path / "run", tmp_path / "data"
  tiny = [f"--config.data.data_dir={data}", "--config.data.synthetic.train_per_class=1",
          "--config.data.synthetic.val_per_class=1", "--config.data.num_frames=4",
          "--config.data.num_workers=0"]
  start = time.perf_counter()
  trained = run(installed, installed["python"], "-m", "gta_jax.train", "--config=synthetic_gta",
                "--workdir", str(workdir), *tiny, "--config.batch_size=4",
                f"--config.total_steps={TOTAL_STEPS}", "--config.optim.warmup_steps=1",
                f"--config.checkpoint_every_steps={TOTAL_STEPS}",
                "--config.eval_every_steps=0", "--config.log_every_steps=1")
  assert "final val top-1 " in trained.stdout, trained.stdout
  seconds = {"train": time.perf_counter() - start}

  start = time.perf_counter()
  evaluated = run(installed, installed["python"], "-m", "gta_jax.eval", "--config=synthetic_gta",
                  "--workdir", str(workdir), *tiny)
  last = evaluated.stdout.strip().splitlines()[-1]
  assert last.startswith(f"val step {TOTAL_STEPS}: top-1 ") and "over 10 videos" in last, last
  seconds["eval"] = time.perf_counter() - start

  start = time.perf_counter()
  video = tmp_path / "clip.mp4"
  frames = synthetic_motion.make_video(0, 12, 40, 48, np.random.default_rng(0))
  with av.open(str(video), "w") as container:
    stream = container.add_stream("libx264", rate=8)
    stream.height, stream.width = frames.shape[1:3]
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  predicted = run(installed, installed["python"], "-m", "gta_jax.predict",
                  "--config=synthetic_gta", "--workdir", str(workdir), *tiny, "--json",
                  str(video))
  doc = json.loads(predicted.stdout)
  assert doc["checkpoint_step"] == TOTAL_STEPS
  (prediction,) = doc["predictions"]
  names = [entry["class"] for entry in prediction["top_k"]]
  assert len(names) == 5 and set(names) <= set(synthetic_motion.CLASS_NAMES)
  seconds["predict"] = time.perf_counter() - start
  print("seconds:", {k: round(v, 1) for k, v in {**installed["seconds"], **seconds}.items()})
