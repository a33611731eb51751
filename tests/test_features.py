"""gta_jax.features against the evaluation path's own forward pass.

The reference takes the eval loader's views of each video, runs `model.apply` with
flax's `capture_intermediates` (every submodule's output, not the sown features the
code under test reads), pools the last residual block's (and res3's) output over
(T, H, W) in numpy and averages over the views.
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import test_predict
from gta_jax import features
from gta_jax import predict
from gta_jax.data import pipeline
from gta_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pooled_blocks(config, variables, views, blocks=("res3_block0", "res5_block0")):
  """`(N, V, T, S, S, 3)` uint8 views -> {block: (N, C)} pooled block outputs, view mean."""
  n, v = views.shape[:2]
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  clips = ((views.reshape((n * v,) + views.shape[2:]) / 255.0 - mean) / std).astype(np.float32)
  apply = jax.jit(functools.partial(registry.build_model(config).apply, train=False,
                                    capture_intermediates=True))
  _, state = apply(variables, clips)
  out = {}
  for block in blocks:
    x = np.asarray(state["intermediates"][block]["__call__"][0], np.float64)
    out[block] = x.mean(axis=(1, 2, 3)).reshape(n, v, -1).mean(axis=1)
  return out


@pytest.fixture(scope="module")
def reference(tiny_gta_run):
  config = tiny_gta_run["config"]
  loader = pipeline.make_eval_loader(config, "val", process_index=0, process_count=1)
  batches = list(loader)
  keep = np.concatenate([b["mask"] for b in batches])
  views = np.concatenate([b["video"] for b in batches])[keep]
  index = np.concatenate([b["video_index"] for b in batches])[keep]
  source = pipeline.open_source(config, "val")
  ids = [source[int(i)]["video_id"].decode() for i in index]
  labels = [int(source[int(i)]["label"]) for i in index]
  return dict(pooled=pooled_blocks(config, tiny_gta_run["variables"], views), ids=ids,
              labels=labels)


def test_split_features_equal_the_eval_forward_pass(tiny_gta_run, reference):
  got = features.extract_split(tiny_gta_run["config"], tiny_gta_run["workdir"], "val")
  assert got["layer"] == "pre_logits" and got["step"] == 0 and got["split"] == "val"
  order = np.argsort(got["video_id"])
  want_order = np.argsort(reference["ids"])
  np.testing.assert_array_equal(got["video_id"][order], np.array(reference["ids"])[want_order])
  np.testing.assert_array_equal(got["label"][order], np.array(reference["labels"])[want_order])
  want = reference["pooled"]["res5_block0"][want_order]
  assert got["features"].shape == want.shape and np.abs(want).max() > 1e-2
  np.testing.assert_allclose(got["features"][order], want, atol=1e-5)


def test_split_and_layer_errors(tiny_gta_run):
  config, workdir = tiny_gta_run["config"], tiny_gta_run["workdir"]
  with pytest.raises(ValueError, match="has no split 'nope'"):
    features.extract_split(config, workdir, "nope")
  with pytest.raises(ValueError, match="unknown feature layer 'res9'"):
    features.extract_split(config, workdir, "val", layer="res9")
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    features.extract_split(config, str(tiny_gta_run["root"] / "nowhere"), "val")


@pytest.mark.slow
def test_cli_on_video_files(tiny_gta_run, tmp_path):
  """`--videos` with a folder and `--layer=res3`: the good file's row equals the
  reference on predict's views of it, the broken one is named, skipped and counted
  (exit status 1)."""
  folder = tmp_path / "clips"
  folder.mkdir()
  test_predict.write_video(folder / "a.mp4", test_predict.moving_blob(9))
  (folder / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 4)
  out = tmp_path / "f.npz"
  flags = [f"--config.{k}={v}" for k, v in tiny_gta_run["overrides"].items()]
  result = subprocess.run(
      [sys.executable, "-m", "gta_jax.features", "--config",
       os.path.join(REPO, "configs", "synthetic_gta.py"), *flags, "--workdir",
       tiny_gta_run["workdir"], f"--out={out}", "--layer=res3", "--videos", str(folder)],
      capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"error: {folder}/b.mp4: cannot decode the video" in result.stderr
  assert "1 of 2 videos could not be read" in result.stderr
  saved = np.load(out)
  assert list(saved["video_id"]) == [f"{folder}/a.mp4"]
  assert list(saved["label"]) == [-1] and str(saved["layer"]) == "res3"
  config = tiny_gta_run["config"]
  views = predict.load_views(str(folder / "a.mp4"), config)[None]
  want = pooled_blocks(config, tiny_gta_run["variables"], views)["res3_block0"]
  np.testing.assert_allclose(saved["features"], want, atol=1e-5)
