"""Text-video retrieval through the real CLIs: train.py, eval.py, gta_jax.search.

A tiny GTA retrieval run on the embedded captioned dataset; a resume from its
step-2 checkpoint reaches its step-4 weights exactly (captions drawn by the data
position, like the clips); a folder of H.264 files searched twice (the second time
from the cache); and a `captioned_folder` of real video files trained and evaluated
with the same commands.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gta_jax.training import finetune

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import real_videos  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(REPO, "configs", "retrieval_synthetic_gta.py")
TINY = [
    "--config.data.synthetic.train_per_class=4", "--config.data.synthetic.val_per_class=2",
    "--config.data.synthetic.train_captions=2", "--config.data.num_frames=4",
    "--config.data.num_workers=0", "--config.batch_size=8", "--config.eval.batch_size=8",
    "--config.total_steps=4", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0",
    "--config.keep_checkpoints=3",
]


def run(args, expect_ok=True):
  result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=600, check=False, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if expect_ok:
    assert result.returncode == 0, result.stderr[-5000:]
  return result


def cli(script, workdir, data_dir, *extra, config=CONFIG):
  return [script, "--config", config, "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("retrieval")
  return workdir, run(cli("train.py", workdir, data_dir))


def params(workdir, step):
  return finetune.read_variables(workdir / "checkpoints" / str(step))


def test_train_eval_and_resume(reference, data_dir, tmp_path):
  workdir, result = reference
  assert "final val text-to-video R@1" in result.stdout
  assert (workdir / "vocab.json").exists()

  result = run(cli("eval.py", workdir, data_dir))
  summary = json.loads((workdir / "eval" / "val_step4.json").read_text())
  keys = [f"{d}_{m}" for d in ("t2v", "v2t") for m in ("r1", "r5", "r10", "medr", "meanr")]
  for key in keys + ["num_videos", "num_captions", "step"]:
    assert key in summary
  assert summary["num_videos"] == summary["num_captions"] == 20 and summary["step"] == 4
  assert all(0 <= summary[f"t2v_r{k}"] <= summary[f"t2v_r{k2}"] <= 1
             for k, k2 in ((1, 5), (5, 10)))
  ranks = (workdir / "eval" / "val_step4_ranks.csv").read_text().splitlines()
  assert len(ranks) == 21 and ranks[0] == "caption,video_index,t2v_rank"

  # A preemption after step 2's checkpoint: the resumed run reaches the same weights.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  run(cli("train.py", resumed, data_dir))
  want, got = params(workdir, 4), params(resumed, 4)
  assert sorted(want) == sorted(got)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_search_a_folder_uses_the_cache(reference, data_dir, tmp_path):
  workdir, _ = reference
  folder = tmp_path / "clips"
  real_videos.make_folder(str(folder), train_per_class=1, val_per_class=0, num_frames=6,
                          width=48, height=40)
  args = ["-m", "gta_jax.search", "--config", CONFIG, "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", "--config.data.num_frames=4",
          "--videos", str(folder), "--query", "a red circle moves to the right", "--top", "3"]
  first = run(args)
  lines = [l for l in first.stdout.splitlines() if l.startswith("  ")]
  assert len(lines) == 3 and all(".mp4" in l for l in lines)
  scores = [float(l.split()[1]) for l in lines]
  assert scores == sorted(scores, reverse=True)
  cached = list((workdir / "search").iterdir())
  assert len(cached) == 1
  second = run(args)
  assert second.stdout == first.stdout
  assert list((workdir / "search").iterdir()) == cached

  broken = run(args[:-6] + ["--split", "val", "--videos", str(folder), "--query", "x"],
               expect_ok=False)
  assert broken.returncode != 0 and "not both" in broken.stderr


def test_captioned_folder_of_real_videos(tmp_path):
  """H.264 files that the project's generator did not draw (a camera over photos),
  captioned in CSV lists: the same train.py / eval.py commands."""
  folder = tmp_path / "real"
  real_videos.make_folder(str(folder), train_per_class=1, val_per_class=1, num_frames=8,
                          width=48, height=40, captions=True)
  workdir = tmp_path / "run"
  extra = ["--config.data.dataset=captioned_folder", f"--config.data.manual_dir={folder}",
           "--config.data.resize_short=32", "--config.data.test_scale=32",
           "--config.data.synthetic.val_per_class=1"]
  run(cli("train.py", workdir, tmp_path / "data", *extra))
  run(cli("eval.py", workdir, tmp_path / "data", *extra))
  summary = json.loads((workdir / "eval" / "val_step4.json").read_text())
  assert summary["num_videos"] == summary["num_captions"] == 10
