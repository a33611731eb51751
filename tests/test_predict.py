"""gta_jax.predict against the shared tiny GTA checkpoint and PyAV-made videos.

The reference decodes the test video with PyAV, takes the segment centres of each
temporal view, round-trips them through JPEG as preparation stores frames (cv2,
`config.data.jpeg_quality`), normalises with torchvision's ImageNet statistics, runs
`model.apply` and averages the softmax over views: all written here, not taken from
the pipeline.
"""

import functools
import json
import os
import subprocess
import sys

import av
import cv2
import jax
import numpy as np
import pytest

from gta_jax import predict
from gta_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, FRAMES, NUM_CLIPS = 32, 4, 2


def write_video(path, frames, fps=10):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv444p"
    stream.options = {"crf": "0"}  # lossless: the reference decodes the same pixels
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def moving_blob(num_frames, size=SIZE):
  """A bright blob crossing a background that darkens: every frame differs."""
  y, x = np.mgrid[:size, :size].astype(np.float32)
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for t in range(num_frames):
    cx = 6 + t * (size - 12) / max(num_frames - 1, 1)
    blob = np.exp(-((x - cx) ** 2 + (y - size / 2) ** 2) / 120)[..., None]
    background = np.stack([3 * x + 40, 3 * y + 30, np.full_like(x, 160 - 12 * t)], -1)
    frames[t] = background * (1 - blob) + np.array([250, 240, 20]) * blob
  return frames


@pytest.fixture(scope="module")
def run_dir(tiny_gta_run, tmp_path_factory):
  """The shared tiny GTA checkpoint (conftest.py), a test video and a broken file."""
  root = tmp_path_factory.mktemp("predict")
  config = tiny_gta_run["config"]
  video = root / "square.mp4"
  write_video(video, moving_blob(11))
  (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
  return dict(root=root, config=config, workdir=tiny_gta_run["workdir"], video=str(video),
              overrides=tiny_gta_run["overrides"],
              want=reference_probs(str(video), config, tiny_gta_run["variables"]))


def jpeg_round_trip(rgb, quality):
  ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


def reference_probs(path, config, variables):
  """Softmax averaged over the temporal views, from a PyAV decode of the file."""
  with av.open(path) as container:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
  n, t = len(frames), config.data.num_frames
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  views = []
  for v in range(NUM_CLIPS):
    idx = [int(n / t * (x + (v + 0.5) / NUM_CLIPS)) for x in range(t)]
    clip = np.stack([jpeg_round_trip(f, config.data.jpeg_quality) for f in frames[idx]])
    views.append((clip.astype(np.float32) / 255 - mean) / std)
  apply = jax.jit(functools.partial(registry.build_model(config).apply, train=False))
  logits = np.asarray(apply(variables, np.stack(views)))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).mean(0)


def test_predict_file_matches_reference(run_dir):
  predictor = predict.Predictor(run_dir["config"], run_dir["workdir"])
  assert predictor.step == 0
  assert predictor.class_names[:2] == ("moving_right", "moving_left")
  got = predictor.predict_file(run_dir["video"])
  want = run_dir["want"]
  assert want.max() > 0.2  # not a uniform output, where anything would match
  np.testing.assert_allclose(got, want, atol=1e-5)
  ranked = predict.top_k(got, predictor.class_names, 5)
  assert [name for name, _ in ranked] == [predictor.class_names[i]
                                          for i in np.argsort(-want)[:5]]
  assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))


def test_load_views_errors_name_the_file(run_dir):
  with pytest.raises(predict.VideoError, match="nothere.mp4: no such file"):
    predict.load_views(str(run_dir["root"] / "nothere.mp4"), run_dir["config"])
  with pytest.raises(predict.VideoError, match="broken.mp4: cannot decode"):
    predict.load_views(str(run_dir["root"] / "broken.mp4"), run_dir["config"])


def cli(run_dir, *args):
  flags = [f"--config.{k}={v}" for k, v in run_dir["overrides"].items()]
  cmd = [sys.executable, "-m", "gta_jax.predict", "--config",
         os.path.join(REPO, "configs", "synthetic_gta.py"), *flags,
         "--workdir", run_dir["workdir"], *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=str(run_dir["root"]),
                        timeout=300, check=False)


@pytest.mark.slow
def test_cli_top5_and_bad_files(run_dir):
  missing = str(run_dir["root"] / "nothere.mp4")
  broken = str(run_dir["root"] / "broken.mp4")
  out = cli(run_dir, broken, run_dir["video"], missing)
  assert out.returncode == 1, out.stderr[-3000:]
  want = run_dir["want"]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == run_dir["video"], out.stdout
  printed = [line.split() for line in lines[1:]]
  assert len(printed) == 5, out.stdout
  from gta_jax.data.builders import synthetic_motion  # pylint: disable=g-import-not-at-top
  order = np.argsort(-want)[:5]
  for rank, (row, c) in enumerate(zip(printed, order), 1):
    assert row[0] == f"{rank}." and row[1] == synthetic_motion.CLASS_NAMES[c], out.stdout
    assert abs(float(row[2]) - want[c]) < 1e-4, out.stdout
  assert f"{missing}: no such file" in out.stderr
  assert f"{broken}: cannot decode the video" in out.stderr


def test_run_json_and_exit_status(run_dir, capsys):
  missing = str(run_dir["root"] / "nothere.mp4")
  status = predict.run(run_dir["config"], run_dir["workdir"], [run_dir["video"], missing],
                       k=3, as_json=True)
  assert status == 1
  doc = json.loads(capsys.readouterr().out)
  assert doc["checkpoint_step"] == 0
  good, bad = doc["predictions"]
  assert bad == {"video": missing, "error": f"{missing}: no such file or folder"}
  assert good["video"] == run_dir["video"] and len(good["top_k"]) == 3
  want = run_dir["want"]
  np.testing.assert_allclose([e["probability"] for e in good["top_k"]],
                             np.sort(want)[::-1][:3], atol=1e-5)


def test_run_on_a_folder_writes_the_csv(run_dir, tmp_path, capsys):
  """A folder stands for its video files (sorted); the unreadable one gets an error row."""
  root = str(run_dir["root"])
  out = tmp_path / "top5.csv"
  status = predict.run(run_dir["config"], run_dir["workdir"], [root], out=str(out))
  assert status == 1
  assert "1 of 2 videos could not be predicted" in capsys.readouterr().err
  import csv  # pylint: disable=g-import-not-at-top
  with open(out, newline="") as f:
    header, broken, good = list(csv.reader(f))
  assert header == ["video"] + [f"{c}_{i}" for i in range(1, 6)
                                for c in ("class", "probability")] + ["error"]
  assert broken[0] == os.path.join(root, "broken.mp4") and "cannot decode" in broken[-1]
  assert good[0] == run_dir["video"] and good[-1] == ""
  want = run_dir["want"]
  from gta_jax.data.builders import synthetic_motion  # pylint: disable=g-import-not-at-top
  order = np.argsort(-want)[:5]
  assert good[1:-1:2] == [synthetic_motion.CLASS_NAMES[c] for c in order]
  np.testing.assert_allclose([float(p) for p in good[2:-1:2]], want[order], atol=1e-5)
