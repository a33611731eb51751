"""Frame sampling against independent, loop-by-loop references of DESIGN.md's formulas."""

import math

import numpy as np
import pytest

from gta_jax.data import sampling

LENGTHS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 23, 24, 31, 64, 100, 301]


def ref_segment_test(n, t, v, num_views):
  tick = n / t
  return [int(tick * (x + (v + 0.5) / num_views)) for x in range(t)]


@pytest.mark.parametrize("t", [1, 4, 8, 16])
@pytest.mark.parametrize("n", LENGTHS)
def test_segment_test_formula(n, t):
  got = sampling.segment_indices(n, t, train=False)
  centres = [int(n / t / 2 + n / t * x) for x in range(t)]
  assert got.tolist() == centres == ref_segment_test(n, t, 0, 1)
  for num_views in (2, 3, 10):
    for v in range(num_views):
      got = sampling.segment_indices(n, t, train=False, view=v, num_views=num_views)
      assert got.tolist() == ref_segment_test(n, t, v, num_views)
      assert got.dtype == np.int64 and got.min() >= 0 and got.max() < n


@pytest.mark.parametrize("t", [1, 4, 8, 16])
@pytest.mark.parametrize("n", LENGTHS)
def test_segment_train_formula(n, t):
  avg = n // t
  for seed in range(5):
    got = sampling.segment_indices(n, t, train=True, rng=np.random.default_rng(seed))
    assert got.shape == (t,) and got.dtype == np.int64
    if avg > 0:
      # Replaying the same generator reproduces `arange(T) * avg + randint(avg)`.
      offsets = np.random.default_rng(seed).integers(avg, size=t)
      assert got.tolist() == [x * avg + int(o) for x, o in zip(range(t), offsets)]
      for x in range(t):  # one frame inside each segment
        assert x * avg <= got[x] < (x + 1) * avg
    else:  # shorter than T: floor(x * n / T), every frame used, in order
      assert got.tolist() == [math.floor(x * n / t) for x in range(t)]
      assert sorted(set(got.tolist())) == list(range(n))


def test_segment_train_covers_every_offset():
  seen = set()
  rng = np.random.default_rng(0)
  for _ in range(200):
    seen.update(sampling.segment_indices(24, 8, train=True, rng=rng).tolist())
  assert seen == set(range(24))


def ref_clip(n, clip_len, interval, start):
  return [(start + i * interval) % n for i in range(clip_len)]


@pytest.mark.parametrize("clip_len,interval", [(1, 1), (4, 2), (8, 8), (16, 1), (32, 2)])
@pytest.mark.parametrize("n", LENGTHS)
def test_clip_formula(n, clip_len, interval):
  max_offset = max(n - clip_len * interval, 0)
  got = sampling.clip_indices(n, clip_len, interval, train=False)
  assert got.tolist() == ref_clip(n, clip_len, interval, max_offset // 2)
  for num_views in (2, 3, 10):
    for v in range(num_views):
      got = sampling.clip_indices(n, clip_len, interval, train=False, view=v,
                                  num_views=num_views)
      start = round(v * max_offset / (num_views - 1))
      assert got.tolist() == ref_clip(n, clip_len, interval, start)
  starts = set()
  for seed in range(40):
    got = sampling.clip_indices(n, clip_len, interval, train=True,
                                rng=np.random.default_rng(seed))
    assert got.dtype == np.int64 and got.min() >= 0 and got.max() < n
    start = int(got[0])
    assert 0 <= start <= max_offset
    assert got.tolist() == ref_clip(n, clip_len, interval, start)
    starts.add(start)
  assert len(starts) == min(max_offset + 1, len(starts)) and (max_offset == 0 or len(starts) > 1)


def test_clip_views_span_the_video():
  got = [sampling.clip_indices(100, 8, 8, train=False, view=v, num_views=3)[0] for v in range(3)]
  assert got == [0, 18, 36]


def test_bad_arguments():
  with pytest.raises(ValueError, match="at least one frame"):
    sampling.segment_indices(0, 8, train=False)
  with pytest.raises(ValueError, match="rng"):
    sampling.segment_indices(10, 8, train=True)
  with pytest.raises(ValueError, match="view"):
    sampling.clip_indices(10, 4, 1, train=False, view=3, num_views=3)
  with pytest.raises(ValueError, match="frame_interval"):
    sampling.clip_indices(10, 4, 0, train=False)
