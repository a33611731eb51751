"""`synthetic_motion`: pairs are time reverses, preparation is deterministic and fast."""

import numpy as np
import pytest

from gta_jax.data import transforms
from gta_jax.data.builders import synthetic_motion as sm


@pytest.mark.parametrize("pair", range(len(sm.PAIRS)))
def test_reverse_of_a_clip_is_the_partner_class(pair):
  for seed in range(3):
    forward = sm.make_video(2 * pair, 16, 40, 48, np.random.default_rng([seed, pair]))
    backward = sm.make_video(2 * pair + 1, 16, 40, 48, np.random.default_rng([seed, pair]))
    assert forward.shape == (16, 40, 48, 3) and forward.dtype == np.uint8
    np.testing.assert_array_equal(forward[::-1], backward)
    assert np.abs(forward[0].astype(int) - forward[-1].astype(int)).mean() > 1  # it moves


def object_mask(video):
  """Pixels that change over the clip (the moving object), per frame."""
  moving = np.abs(video.astype(int) - np.median(video, axis=0)).sum(-1) > 60
  return moving


def test_motions_go_the_named_way():
  rng = np.random.default_rng(0)
  for _ in range(5):
    right = sm.render_video(0, 16, 40, 48, rng).astype(int)
    m = object_mask(right)
    xs = [np.nonzero(f)[1].mean() for f in m[[0, -1]]]
    assert xs[1] > xs[0]  # moving right
    down = sm.render_video(1, 16, 40, 48, rng).astype(int)
    m = object_mask(down)
    ys = [np.nonzero(f)[0].mean() for f in m[[0, -1]]]
    assert ys[1] > ys[0]  # moving down
    grow = sm.render_video(2, 16, 40, 48, rng).astype(int)
    m = object_mask(grow)
    assert m[-1].sum() > m[0].sum()  # growing


def bar_orientation(frame):
  """The axis of the pixels far from the frame's median colour, in radians mod pi,
  measured from +x towards +y (down the screen: clockwise)."""
  far = np.abs(frame.astype(int) - np.median(frame.reshape(-1, 3), axis=0)).sum(-1) > 100
  ys, xs = np.nonzero(far)
  xs, ys = xs - xs.mean(), ys - ys.mean()
  return 0.5 * np.arctan2(2 * (xs * ys).mean(), (xs**2).mean() - (ys**2).mean())


def test_bar_turns_clockwise():
  rng = np.random.default_rng(0)
  for _ in range(5):
    video = sm.render_video(3, 16, 40, 48, rng)
    angles = np.array([bar_orientation(f) for f in video])
    steps = (np.diff(angles) + np.pi / 2) % np.pi - np.pi / 2  # the bar is symmetric
    assert np.all(steps > -0.05), steps
    assert 0.4 * np.pi < steps.sum() < 0.9 * np.pi  # it turns by 0.5-0.8 pi


def test_prepared_dataset_is_deterministic_and_labelled(tmp_path):
  kwargs = dict(train_per_class=2, val_per_class=1, num_frames=8, height=40, width=48, seed=1)
  sources = []
  for d in ("a", "b"):
    b = sm.SyntheticMotion(data_dir=str(tmp_path / d), **kwargs)
    b.download_and_prepare()
    sources.append(b.as_data_source("train"))
  a, b = sources
  assert len(a) == len(b) == 20
  by_id = {x["video_id"]: x for x in (b[i] for i in range(len(b)))}
  labels = set()
  for i in range(len(a)):
    x = a[i]
    y = by_id[x["video_id"]]
    assert x["label"] == y["label"] and list(x["frames"]) == list(y["frames"])
    name = x["video_id"].decode().split("/")[1]
    assert sm.CLASS_NAMES[x["label"]] == name
    assert x["num_frames"] == len(x["frames"]) == 8
    assert transforms.decode_jpeg(x["frames"][0]).shape == (40, 48, 3)
    labels.add(int(x["label"]))
  assert labels == set(range(10))


def test_default_length_samples_a_video_and_its_reverse_alike():
  """With the default 24 frames and T = 8, every sampler picks mirror-image frame sets, so
  the frames an order-blind model sees have the same distribution in both classes."""
  from gta_jax import config_lib
  from gta_jax.data import sampling
  c = config_lib.synthetic_config()
  n, t = c.data.synthetic.num_frames, c.data.num_frames
  mirror = lambda idx: sorted(n - 1 - i for i in idx)
  test = sampling.segment_indices(n, t, train=False).tolist()
  assert mirror(test) == sorted(test)
  dense = sampling.clip_indices(n, t, 1, train=False).tolist()
  assert mirror(dense) == sorted(dense)
  # Train: the per-segment windows mirror each other (segment x <-> segment T-1-x).
  avg = n // t
  windows = {tuple(range(x * avg, (x + 1) * avg)) for x in range(t)}
  assert n % t == 0 and {tuple(mirror(w)) for w in windows} == windows
