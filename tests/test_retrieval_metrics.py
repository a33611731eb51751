"""Retrieval ranks against a brute-force reference: ties, padding, devices, processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gta_jax.retrieval import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_ranks(videos, texts, caption_video):
  """The full score matrix (float64) and, per query, a sort of its candidates in which
  a tie puts the true item last."""
  scores = np.asarray(texts, np.float64) @ np.asarray(videos, np.float64).T  # (Nt, Nv)
  t2v = []
  for i, true in enumerate(caption_video):
    order = sorted(range(len(videos)), key=lambda j: (-scores[i, j], j == true))
    t2v.append(order.index(true) + 1)
  v2t = []
  for v in range(len(videos)):
    own = [i for i in range(len(texts)) if caption_video[i] == v]
    best = max(own, key=lambda i: scores[i, v])
    candidates = [best] + [i for i in range(len(texts)) if caption_video[i] != v]
    order = sorted(candidates, key=lambda i: (-scores[i, v], i == best))
    v2t.append(order.index(best) + 1)
  return {"t2v": np.array(t2v), "v2t": np.array(v2t)}


def gallery(kind, num_videos=40, captions_per_video=3, dim=16, seed=0):
  """Videos, captions near their video, and planted exact ties: videos 1 and 2 copy
  video 0, video 4 copies video 3's first caption, captions 5 and 6 copy caption 0 and
  caption 7 copies caption 10 (a caption of another video).

  kind: 'gaussian' (float vectors), 'quantized' (multiples of 1/16, every dot product
  exact, so many exact ties) or 'integer' (small integers, ties everywhere).
  """
  rng = np.random.default_rng(seed)
  videos = rng.normal(size=(num_videos, dim))
  caption_video = np.concatenate([np.arange(num_videos)] * captions_per_video)
  rng.shuffle(caption_video)
  texts = videos[caption_video] + rng.normal(size=(len(caption_video), dim))
  if kind == "quantized":
    videos, texts = np.round(videos * 16) / 16, np.round(texts * 16) / 16
  elif kind == "integer":
    videos = rng.integers(-2, 3, size=videos.shape).astype(np.float64)
    texts = rng.integers(-2, 3, size=texts.shape).astype(np.float64)
  videos[1] = videos[2] = videos[0]
  videos[4] = texts[np.flatnonzero(caption_video == 3)[0]]
  texts[5] = texts[6] = texts[0]
  texts[7] = texts[10]
  return videos.astype(np.float32), texts.astype(np.float32), caption_video


@pytest.mark.parametrize("kind", ["gaussian", "quantized", "integer"])
@pytest.mark.parametrize("block_size", [1024, 7])
def test_ranks_match_the_brute_force_reference(kind, block_size):
  videos, texts, caption_video = gallery(kind)
  got = metrics.ranks(videos, texts, caption_video, block_size=block_size)
  want = reference_ranks(videos, texts, caption_video)
  assert got["t2v"].dtype == np.int32 and got["v2t"].dtype == np.int32
  assert got["t2v"].shape == (len(texts),) and got["v2t"].shape == (len(videos),)
  np.testing.assert_array_equal(got["t2v"], want["t2v"])
  np.testing.assert_array_equal(got["v2t"], want["v2t"])


def test_exact_ties_count_against_the_model():
  videos, texts, caption_video = gallery("gaussian")
  got = metrics.ranks(videos, texts, caption_video, block_size=5)
  # Videos 0, 1 and 2 are one vector: the two copies rank above a caption's own video.
  assert np.all(got["t2v"][np.isin(caption_video, [0, 1, 2])] >= 3)
  # One vector for everything: every wrong item ties with the true one.
  constant = metrics.ranks(np.ones((3, 2)), np.ones((6, 2)), np.array([0, 1, 2] * 2))
  np.testing.assert_array_equal(constant["t2v"], [3] * 6)
  np.testing.assert_array_equal(constant["v2t"], [5] * 3)  # behind the 4 foreign captions


def test_other_true_captions_never_push_a_video_down():
  videos = np.eye(2, dtype=np.float32)
  texts = np.array([[1, 0], [1, 0], [0.5, 0], [0, 1]], np.float32)  # 3 captions of video 0
  got = metrics.ranks(videos, texts, np.array([0, 0, 0, 1]))
  np.testing.assert_array_equal(got["v2t"], [1, 1])
  np.testing.assert_array_equal(got["t2v"], [1, 1, 1, 1])


def test_a_perfect_embedding_ranks_everything_first():
  videos = np.eye(30, dtype=np.float32)
  caption_video = np.repeat(np.arange(30), 4)
  got = metrics.ranks(videos, videos[caption_video], caption_video, block_size=16)
  assert np.all(got["t2v"] == 1) and np.all(got["v2t"] == 1)
  summary = metrics.summarize(got)
  assert summary["t2v_r1"] == summary["v2t_r1"] == 1.0
  assert summary["rsum"] == 6.0
  assert summary["t2v_medr"] == summary["v2t_meanr"] == 1.0
  assert (summary["num_videos"], summary["num_captions"]) == (30, 120)


def test_a_shuffled_pairing_drops_to_chance():
  rng = np.random.default_rng(1)
  num_videos = 200
  videos = rng.normal(size=(num_videos, 32)).astype(np.float32)
  caption_video = np.repeat(np.arange(num_videos), 2)
  texts = (videos[caption_video] + 0.1 * rng.normal(size=(2 * num_videos, 32))).astype(
      np.float32)
  paired = metrics.summarize(metrics.ranks(videos, texts, caption_video, block_size=64))
  assert paired["t2v_r1"] > 0.95 and paired["v2t_r1"] > 0.95
  shuffled = metrics.summarize(
      metrics.ranks(videos, texts, rng.permutation(caption_video), block_size=64))
  assert shuffled["t2v_r1"] < 5 / num_videos and shuffled["v2t_r1"] < 5 / num_videos
  # A random rank is uniform on 1..Nv: mean (Nv + 1) / 2.
  assert shuffled["t2v_meanr"] == pytest.approx((num_videos + 1) / 2, rel=0.15)


def test_summarize_counts_ranks_up_to_k():
  summary = metrics.summarize({"t2v": np.array([1, 2, 5, 6, 10, 11]),
                               "v2t": np.array([1, 1, 20])})
  assert summary["t2v_r1"] == pytest.approx(1 / 6)
  assert summary["t2v_r5"] == pytest.approx(3 / 6)
  assert summary["t2v_r10"] == pytest.approx(5 / 6)
  assert summary["t2v_medr"] == 5.5 and summary["t2v_meanr"] == pytest.approx(35 / 6)
  assert summary["v2t_r1"] == pytest.approx(2 / 3) and summary["v2t_medr"] == 1.0
  assert summary["rsum"] == pytest.approx(1 / 6 + 3 / 6 + 5 / 6 + 2 / 3 * 3)
  assert all(type(v) in (float, int) for v in summary.values())


def test_jax_inputs_are_accepted():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  videos, texts, caption_video = gallery("quantized", num_videos=10, captions_per_video=2)
  got = metrics.ranks(jnp.asarray(videos), jnp.asarray(texts), jnp.asarray(caption_video))
  want = reference_ranks(videos, texts, caption_video)
  np.testing.assert_array_equal(got["t2v"], want["t2v"])
  np.testing.assert_array_equal(got["v2t"], want["v2t"])


@pytest.mark.parametrize("videos,texts,caption_video,block_size,message", [
    (np.zeros((2, 3)), np.zeros((2, 4)), [0, 1], 8, "must be"),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0], 8, r"caption_video must be \(2,\)"),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0, 2], 8, "outside"),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0, 0], 8, "video 1"),
    (np.full((2, 3), np.nan), np.zeros((2, 3)), [0, 1], 8, "NaN"),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0, 1], 0, "block_size"),
])
def test_bad_inputs_are_named(videos, texts, caption_video, block_size, message):
  with pytest.raises(ValueError, match=message):
    metrics.ranks(videos, texts, np.asarray(caption_video), block_size=block_size)


# -- several devices and processes -----------------------------------------------------

SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import jax
from gta_jax.training import sharding
{setup}
from gta_jax.retrieval import metrics
from test_retrieval_metrics import gallery
videos, texts, caption_video = gallery("gaussian", num_videos=37, captions_per_video=3)
out = {{"devices": jax.device_count(), "process": jax.process_index()}}
for name, mesh in (("mesh", sharding.make_mesh()), ("single", None)):
  # 10 rows a block: rounded up to a multiple of the device count.
  got = metrics.ranks(videos, texts, caption_video, mesh=mesh, block_size=10)
  out[name] = {{k: v.tolist() for k, v in got.items()}}
print(json.dumps(out))
"""


def run_script(setup, devices, extra_env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(extra_env or {}),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = SCRIPT.format(tests=os.path.join(REPO, "tests"), setup=setup)
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def result(process):
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def reference():
  videos, texts, caption_video = gallery("gaussian", num_videos=37, captions_per_video=3)
  return {k: v.tolist() for k, v in reference_ranks(videos, texts, caption_video).items()}


def test_four_devices_give_the_ranks_of_one():
  out = result(run_script("", devices=4))
  assert out["devices"] == 4
  assert out["mesh"] == out["single"] == reference()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_two_devices_give_the_ranks_of_one_on_each():
  address = f"127.0.0.1:{free_port()}"
  processes = [
      run_script(f"sharding.initialize_distributed({address!r}, 2, {i})", devices=2)
      for i in range(2)
  ]
  outs = [result(p) for p in processes]
  want = reference()
  for i, out in enumerate(outs):
    assert (out["devices"], out["process"]) == (4, i)
    assert out["mesh"] == out["single"] == want
