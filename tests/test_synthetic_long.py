"""The second embedded dataset, `synthetic_long`: its pairs, its events, its seeds."""

import numpy as np
import pytest

from gta_jax.data.builders import synthetic_long as sl

N, H, W = 20, 40, 48


def _object_pixels(video: np.ndarray) -> np.ndarray:
  """Per frame, the pixels far from the clip's temporal median (the background, which
  does not move in the event pairs): `(n, H, W)` booleans."""
  frames = video.astype(np.float64)
  background = np.median(frames, axis=0)
  return np.abs(frames - background).sum(-1) > 60


def _events(video: np.ndarray, pair: int) -> tuple[int, int]:
  """The frames of the first and second kind of event of `pair`, read off the pixels."""
  mask = _object_pixels(video)
  area = mask.sum((1, 2))
  brightness = video.reshape(len(video), -1).mean(1)
  if pair == 0:  # flash: the brightest frame; blink: the frame without the object
    flash = int(np.argmax(brightness))
    others = [t for t in range(len(video)) if t != flash]
    return flash, others[int(np.argmin(area[others]))]
  # dim: the darkest frame; recolour: of the others, the frame whose object's colour
  # is farthest from its usual one.
  dim = int(np.argmin(brightness))
  others = [t for t in range(len(video)) if t != dim]
  colour = np.array([video[t][mask[t]].mean(0) for t in others])
  typical = np.median(colour, axis=0)
  return dim, others[int(np.argmax(np.abs(colour - typical).sum(1)))]


@pytest.mark.parametrize("pair", sl.EVENT_PAIRS)
def test_events_are_half_a_clip_apart_and_away_from_the_ends(pair):
  for i in range(6):
    video, (a, b) = sl.render_events(pair, N, H, W, np.random.default_rng([7, pair, i]))
    assert _events(video, pair) == (a, b)  # seen in the pixels, in that order
    assert b - a >= N / 2
    assert a >= sl.MARGIN and b <= N - 1 - sl.MARGIN
    # The second class of the pair shows the second kind of event first.
    reverse = sl.make_video(2 * pair + 1, N, H, W, np.random.default_rng([7, pair, i]))
    first_kind, second_kind = _events(reverse, pair)
    assert (first_kind, second_kind) == (N - 1 - a, N - 1 - b)
    assert second_kind < first_kind


def test_event_times_have_the_same_law_forwards_and_backwards():
  rng = np.random.default_rng(0)
  times = [sl.event_times(N, rng) for _ in range(3000)]
  forward = {t: times.count(t) for t in set(times)}
  backward = {(N - 1 - b, N - 1 - a): c for (a, b), c in forward.items()}
  assert set(forward) == set(backward)
  for t, count in forward.items():
    assert abs(count - backward[t]) < 0.15 * count + 30


@pytest.mark.parametrize("label", range(len(sl.CLASS_NAMES)))
def test_the_second_class_of_a_pair_is_the_first_played_backwards(label):
  forward = sl.make_video(label - label % 2, N, H, W, np.random.default_rng([3, label]))
  video = sl.make_video(label, N, H, W, np.random.default_rng([3, label]))
  assert video.shape == (N, H, W, 3) and video.dtype == np.uint8
  np.testing.assert_array_equal(video, forward[::-1] if label % 2 else forward)


def _scene_shift(first: np.ndarray, last: np.ndarray, reach: int) -> np.ndarray:
  """The whole-pixel `(dx, dy)`, each within `reach`, that best maps `first` onto
  `last` (`last[y + dy, x + dx]` ~ `first[y, x]`): the least median absolute difference
  over their overlap, which the objects (well under half of it) do not sway."""
  h, w = first.shape[:2]
  best = None
  for dy in range(-reach, reach + 1):
    for dx in range(-reach, reach + 1):
      a = first[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
      b = last[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
      error = np.median(np.abs(a - b).sum(-1))
      if best is None or error < best[0]:
        best = (error, dx, dy)
  return np.array(best[1:], np.float64)


@pytest.mark.parametrize("pair", (2, 3))
def test_the_relation_pairs_drift_the_whole_scene(pair):
  """The scene of relation videos drifts by 0.08-0.15 of the width, as the shift that
  best maps the first frame onto the last shows."""
  for i in range(4):
    video, drift = sl.render_relation(pair, N, H, W, np.random.default_rng([5, i]))
    assert 0.08 * W - 1e-6 <= np.hypot(*(drift[-1] - drift[0])) <= 0.15 * W + 1e-6
    frames = video.astype(np.float64)
    seen = _scene_shift(frames[0], frames[-1], reach=int(0.15 * W) + 1)
    np.testing.assert_allclose(seen, drift[-1] - drift[0], atol=3.5)
    assert np.hypot(*seen) >= 0.05 * W  # the texture is smooth: a whole-pixel estimate


def _drawn_objects(monkeypatch, pair: int, seed) -> np.ndarray:
  """The objects a relation video of `pair` draws: `(n, 2, 3)` centre x, y and radius
  of the first and the second object (drawn over the first) in each frame."""
  calls = []
  monkeypatch.setattr(sl.sm, "draw", lambda img, shape, x, y, r, angle, colour:
                      calls.append((x, y, r)))
  sl.render_relation(pair, N, H, W, np.random.default_rng(seed))
  return np.array(calls).reshape(N, 2, 3)


@pytest.mark.parametrize("pair", (2, 3))
def test_the_relation_ends_in_a_lasting_state_inside_the_centre_crop(monkeypatch, pair):
  """The objects close in (or the small one slides behind the large one) over 45-60%
  of the clip, then stay in contact (hidden); both stay inside the central H x H
  square that a centre crop after a short-side resize keeps."""
  first_still = int(np.ceil(sl.CONTACT_FRACTION[1] * (N - 1)))
  last_moving = int(np.floor(sl.CONTACT_FRACTION[0] * (N - 1))) - 1
  for i in range(6):
    objects = _drawn_objects(monkeypatch, pair, [7, pair, i])
    centres, radii = objects[..., :2], objects[0, :, 2]
    left, right = (W - H) / 2, (W + H) / 2
    assert (centres[..., 0] - radii >= left - 1e-6).all()
    assert (centres[..., 0] + radii <= right + 1e-6).all()
    assert (centres[..., 1] - radii >= -1e-6).all()
    assert (centres[..., 1] + radii <= H + 1e-6).all()
    distance = np.hypot(*(centres[:, 0] - centres[:, 1]).T)
    assert (np.diff(distance) <= 1e-9).all()  # closing in, never apart again
    end = 0.8 * radii.sum() if pair == 2 else 0.0  # overlapping; hidden (concentric)
    np.testing.assert_allclose(distance[first_still:], end, atol=1e-6)
    assert (distance[:last_moving + 1] > end + 1.0).all()
    if pair == 2:
      assert distance[0] >= radii.sum() + 0.3 * H - 1e-6
    else:  # the small one fits inside the large one's inscribed circle
      assert radii[0] <= radii[1] / np.sqrt(2)


def test_the_builder_is_deterministic_by_seed(tmp_path):
  def first_videos(seed):
    builder = sl.SyntheticLong(data_dir=str(tmp_path), train_per_class=1,
                               val_per_class=1, num_frames=N, seed=seed)
    return [(k, v["label"], list(v["frames"])) for k, v in
            builder._generate_synthetic("val")]  # pylint: disable=protected-access
  once, again, other = first_videos(0), first_videos(0), first_videos(1)
  assert [label for _, label, _ in once] == list(range(len(sl.CLASS_NAMES)))
  assert once == again
  assert all(a[2] != b[2] for a, b in zip(once, other))


def test_too_few_frames_for_the_events_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"synthetic_long needs .*>= 18 frames.*16"):
    sl.SyntheticLong(data_dir=str(tmp_path), num_frames=16)
