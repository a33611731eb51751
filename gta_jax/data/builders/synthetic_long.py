"""`synthetic_long`: the second embedded dataset, long-range order and object relations.

Eight classes in four pairs, each class the time-reverse of its partner
(docs/ablations.md has the design and what each model should solve):

  flash_then_blink / blink_then_flash, dim_then_recolour / recolour_then_dim:
    one object wanders along a smooth random path; two one-frame events happen, the
    first to the whole frame (it brightens; it darkens), the second to the object
    (it is not drawn; it is drawn in a second colour), at least half a clip apart and
    `MARGIN` frames from either end. The class is which came first.
  approaching / separating, hiding / emerging:
    two objects move relative to each other along a random direction (their
    centres close in until they overlap; a small object slides behind a large one),
    then stay in that state (in contact; hidden) for the rest of the clip, while the
    whole scene, background and objects, drifts a little.

Rendered with `synthetic_motion`'s machinery (backgrounds, shapes, colours, noise).
Every random choice besides the class has a law that time reversal leaves unchanged,
so an order-blind model is at chance within each pair. Deterministic from the seed:
video `i` of a split uses `default_rng([seed, split, i])`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import tensorflow_datasets as tfds

from gta_jax.data.builders import synthetic_motion as sm

PAIRS = (("flash_then_blink", "blink_then_flash"),
         ("dim_then_recolour", "recolour_then_dim"),
         ("approaching", "separating"), ("hiding", "emerging"))
CLASS_NAMES = tuple(name for pair in PAIRS for name in pair)
EVENT_PAIRS = (0, 1)  # the long-range order pairs; the others are relations
MARGIN = 4  # frames between an event and either end of the clip
# The relation pairs' relative motion takes this fraction of the clip (a uniform
# draw); for the rest the objects stay in contact (approaching) or hidden (hiding).
CONTACT_FRACTION = (0.45, 0.6)
# The fewest frames with room for two events half a clip apart (at least 9 frames)
# and MARGIN frames from either end: 4 + 9 + 1 + 4.
MIN_FRAMES = 18


def event_times(num_frames: int, rng: np.random.Generator) -> tuple[int, int]:
  """The frames `(a, b)` of the two events: `b - a >= num_frames / 2`, both at least
  `MARGIN` frames from either end; the law of `(a, b)` is that of `(n-1-b, n-1-a)`."""
  n = num_frames
  gap = int(rng.integers(math.ceil(n / 2), n - 2 * MARGIN))  # b - a
  a = int(rng.integers(MARGIN, n - MARGIN - gap))
  return a, a + gap


def _wander(n: int, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator
            ) -> np.ndarray:
  """A smooth random path in the box `[lo, hi]`, `(n, 2)`: per axis a sinusoid of
  random frequency and a uniform phase (a law that time reversal leaves unchanged)."""
  u = np.linspace(0.0, 1.0, n)[:, None]
  freq = rng.uniform(0.5, 1.5, size=2)
  phase = rng.uniform(0.0, 2 * math.pi, size=2)
  return lo + (hi - lo) * 0.5 * (1.0 + np.sin(2 * math.pi * freq * u + phase))


def _finish(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Pixel noise, then uint8."""
  frames = frames + np.float32(rng.uniform(2.0, 5.0)) * rng.standard_normal(
      frames.shape, dtype=np.float32)
  return np.clip(frames, 0, 255).astype(np.uint8)


def render_events(pair: int, num_frames: int, height: int, width: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
  """A forward video of long-range pair `pair` (0 or 1) and its events' frames."""
  n, h, w = num_frames, height, width
  bg = sm.background(rng, h, w)
  shape = sm.SHAPES[int(rng.integers(len(sm.SHAPES)))]
  colour = sm.contrasting(rng, bg)
  r = rng.uniform(0.1, 0.14) * min(h, w)
  angle = rng.uniform(0, 2 * math.pi)
  path = _wander(n, np.array([r, r]), np.array([w - r, h - r]), rng)
  a, b = event_times(n, rng)
  colours, drawn = [colour] * n, np.ones(n, bool)
  frames = np.repeat(bg[None], n, axis=0)
  if pair == 0:  # flash (the frame brightens), then blink (no object)
    drawn[b] = False
  else:  # dim (the frame darkens), then recolour
    second = sm.contrasting(rng, bg)
    while np.abs(np.subtract(second, colour)).sum() < 150:
      second = sm.contrasting(rng, bg)
    colours[b] = second
  for t in range(n):
    if drawn[t]:
      sm.draw(frames[t], shape, path[t, 0], path[t, 1], r, angle, colours[t])
  if pair == 0:
    frames[a] = 255.0 - 0.4 * (255.0 - frames[a])
  else:
    frames[a] = 0.4 * frames[a]
  return _finish(frames, rng), (a, b)


def _drifting_background(rng: np.random.Generator, h: int, w: int,
                         shift: np.ndarray) -> np.ndarray:
  """`(n, h, w, 3)` views of one texture, translated by `shift[t]` pixels."""
  m = int(np.ceil(np.abs(shift).max())) + 2
  canvas = sm.background(rng, h + 2 * m, w + 2 * m)
  return np.stack([
      cv2.warpAffine(canvas, np.float32([[1, 0, m - dx], [0, 1, m - dy]]), (w, h),
                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
      for dx, dy in shift])


def render_relation(pair: int, num_frames: int, height: int, width: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A forward video of relation pair `pair` (2: approaching, 3: hiding) and the
  scene's drift, `(n, 2)` pixels (x, y) from where it is halfway through.

  The relative motion takes the first `CONTACT_FRACTION` of the clip; for the rest the
  objects stay in its end state (in contact; hidden). Both objects stay inside the
  central `short x short` square, the part of the frame that the centre crop of a
  short-side resize keeps."""
  n, h, w = num_frames, height, width
  short = min(h, w)
  moving = rng.uniform(*CONTACT_FRACTION) * (n - 1)  # frames until the end state
  u = np.minimum(np.arange(n) / moving, 1.0) ** rng.uniform(0.8, 1.25)
  if pair == 2:  # two small objects, their centres closing in until they overlap
    shapes = [sm.SHAPES[int(i)] for i in rng.integers(len(sm.SHAPES), size=2)]
    radii = rng.uniform(0.1, 0.13, size=2) * short
    near = 0.8 * radii.sum()
    far = radii.sum() + rng.uniform(0.3, 0.4) * short
    offsets = (far + (near - far) * u)[:, None] * np.array([-0.5, 0.5])  # along an axis
  else:  # a small object sliding behind a large one (a circle or a square)
    shapes = [sm.SHAPES[int(rng.integers(len(sm.SHAPES)))],
              ("circle", "square")[int(rng.integers(2))]]
    # A square of the large one's smallest size (inradius 0.24 / sqrt(2) > 0.12)
    # still hides the small one.
    radii = np.array([rng.uniform(0.1, 0.12), rng.uniform(0.24, 0.28)]) * short
    start = radii.sum() + rng.uniform(4.0, 8.0)
    offsets = np.stack([start * (1.0 - u), np.zeros(n)], -1)
  angles = rng.uniform(0, 2 * math.pi, size=2)
  box_lo = np.array([(w - short) / 2, (h - short) / 2])
  box_hi = box_lo + short
  # Redraw the directions until the objects stay in the box: the accepted law is
  # still unchanged by reversal (the test is symmetric in time).
  while True:
    axis = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(axis), math.sin(axis)])
    drift_angle = rng.uniform(0, 2 * math.pi)
    drift = rng.uniform(0.08, 0.15) * w * (np.linspace(-0.5, 0.5, n)[:, None]) * np.array(
        [math.cos(drift_angle), math.sin(drift_angle)])
    centres = [drift + offsets[:, i:i + 1] * direction for i in range(2)]
    lo = np.max([(box_lo + radii[i] - c).max(0) for i, c in enumerate(centres)], 0)
    hi = np.min([(box_hi - radii[i] - c).min(0) for i, c in enumerate(centres)], 0)
    if np.all(lo < hi):
      break
  middle = rng.uniform(lo, hi)
  bg = _drifting_background(rng, h, w, drift)
  colours = [sm.contrasting(rng, bg[0])]
  colours.append(sm.contrasting(rng, bg[0]))
  while np.abs(np.subtract(colours[0], colours[1])).sum() < 150:
    colours[1] = sm.contrasting(rng, bg[0])
  frames = bg.copy()
  for t in range(n):
    for i in range(2):  # the second object is drawn over the first
      x, y = middle + centres[i][t]
      sm.draw(frames[t], shapes[i], x, y, radii[i], angles[i], colours[i])
  return _finish(frames, rng), drift


def render_video(pair: int, num_frames: int, height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
  """A random forward video of pair `pair` (its first class): `(n, H, W, 3)` uint8."""
  if pair in EVENT_PAIRS:
    return render_events(pair, num_frames, height, width, rng)[0]
  return render_relation(pair, num_frames, height, width, rng)[0]


def make_video(label: int, num_frames: int, height: int, width: int,
               rng: np.random.Generator) -> np.ndarray:
  """A video of class `label`: its pair's forward draw, reversed for the second class."""
  video = render_video(label // 2, num_frames, height, width, rng)
  return video[::-1] if label % 2 else video


class SyntheticLong(sm.SyntheticMotion, skip_registration=True):
  """The second embedded dataset (see the module docstring); the same parameters as
  `synthetic_motion` (`config.data.synthetic`), at least `MIN_FRAMES` frames."""

  name = "synthetic_long"
  CLASS_NAMES = CLASS_NAMES
  MIN_FRAMES = MIN_FRAMES
  make_video = staticmethod(make_video)
  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {
      "1.0.0": "Two long-range order pairs and two relation pairs.",
      "1.1.0": "The relation pairs' objects at synthetic_motion's sizes; the second "
               "long-range pair dim_then_recolour (a frame-wide first event), "
               "replacing pulse_then_recolour (docs/ablations.md, Revision 1.1.0).",
      "1.2.0": "The relation pairs: a drift smaller than the relative motion, both "
               "objects inside the centre crop, small objects closing in from further "
               "apart, a larger occluder (docs/ablations.md, Revision 1.2.0).",
      "1.3.0": "The relation pairs end in a lasting state: the objects close in until "
               "they overlap, the small one stays hidden, for the last 40-55% of the "
               "clip (docs/ablations.md, Revision 1.3.0).",
  }
