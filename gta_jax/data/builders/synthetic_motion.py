"""`synthetic_motion`: the embedded dataset, procedural videos that need temporal reasoning.

Ten classes in five pairs, each class the time-reverse of its partner:

  moving_right / moving_left, moving_down / moving_up, growing / shrinking,
  rotating_clockwise / rotating_anticlockwise, appearing / vanishing.

Every video draws a random scene (textured background, object shape, colour, size,
start position, speed, pixel noise) and a random motion of the pair's first class; a
video of the second class is the same kind of draw played backwards. So the
frames of the two classes of a pair have the same distribution, and a model blind to frame
order (TSN) is at chance within each pair, while a temporal model can solve every pair.

Deterministic from the seed: video `i` of a split uses `default_rng([seed, split, i])`.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import tensorflow_datasets as tfds

from gta_jax.data import transforms
from gta_jax.data.builders import base

PAIRS = (("moving_right", "moving_left"), ("moving_down", "moving_up"),
         ("growing", "shrinking"), ("rotating_clockwise", "rotating_anticlockwise"),
         ("appearing", "vanishing"))
CLASS_NAMES = tuple(name for pair in PAIRS for name in pair)
SPLITS = ("train", "val")
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_BAR_HALF_ANGLE = 0.17  # the bar's corners seen from its centre: about 1:6 wide


def draw(img: np.ndarray, shape: str, cx: float, cy: float, r: float, angle: float,
         colour) -> None:
  """Draws a filled `shape` of radius `r` centred at `(cx, cy)` into `img`, sub-pixel."""
  s = 1 << _SHIFT
  if shape == "circle":
    cv2.circle(img, (int(cx * s), int(cy * s)), max(int(r * s), 1), colour, -1, cv2.LINE_AA,
               _SHIFT)
    return
  if shape == "square":
    k = np.arange(4) * math.pi / 2 + math.pi / 4
    rr = np.full(4, r)
  elif shape == "triangle":
    k = np.arange(3) * 2 * math.pi / 3
    rr = np.full(3, r)
  elif shape == "diamond":
    k = np.arange(4) * math.pi / 2
    rr = np.array([r, 0.6 * r, r, 0.6 * r])
  elif shape == "bar":  # a long thin rectangle through the centre
    k = np.array([-_BAR_HALF_ANGLE, _BAR_HALF_ANGLE, math.pi - _BAR_HALF_ANGLE,
                  math.pi + _BAR_HALF_ANGLE])
    rr = np.full(4, r)
  else:  # cross
    k = np.repeat(np.arange(4) * math.pi / 2, 3) + np.tile([-0.35, 0.0, 0.35], 4)
    rr = np.tile([0.45 * r, r, 0.45 * r], 4)
  k = k + angle
  pts = np.stack([cx + rr * np.cos(k), cy + rr * np.sin(k)], -1)
  cv2.fillPoly(img, [np.round(pts * s).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A smooth random texture around a random base colour."""
  base_colour = rng.uniform(40, 215, size=3)
  grid = rng.normal(0, rng.uniform(6, 20), size=(int(rng.integers(2, 6)),
                                                 int(rng.integers(2, 6)), 3))
  tex = cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
  return np.clip(base_colour + tex, 0, 255).astype(np.float32)


def contrasting(rng: np.random.Generator, bg: np.ndarray):
  """A random colour far (L1 > 150) from the background's mean."""
  mean = bg.reshape(-1, 3).mean(0)
  while True:
    c = rng.uniform(0, 255, size=3)
    if np.abs(c - mean).sum() > 150:
      return tuple(float(v) for v in c)


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a video's frames show, besides its motion (the words of its captions).

  Attributes:
    shape: one of `SHAPES`, or `bar` (the rotation pair's object).
    colour: the object's RGB colour, 0-255.
    size: where the object's size lies in its pair's range, 0 (smallest) to 1.
    position: the object's centre in the middle frame, `(x / W, y / H)` (the same in
      a video and its time-reversed twin).
  """
  shape: str
  colour: tuple[float, float, float]
  size: float
  position: tuple[float, float]


def render_video(pair: int, num_frames: int, height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
  """A random forward motion of pair `pair` (its first class): `(n, H, W, 3)` uint8."""
  return render_scene(pair, num_frames, height, width, rng)[0]


def render_scene(pair: int, num_frames: int, height: int, width: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, Scene]:
  """:func:`render_video`'s frames and the :class:`Scene` they show (same draws)."""
  n, h, w = num_frames, height, width
  bg = background(rng, h, w)
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  colour = contrasting(rng, bg)
  short = min(h, w)
  size = rng.uniform(0.13, 0.2)
  r = size * short  # object radius
  size = (size - 0.13) / (0.2 - 0.13)
  angle0 = rng.uniform(0, 2 * math.pi)
  u = np.linspace(0.0, 1.0, n)
  # Ease the motion a little, randomly (speed profile), the same way for both directions.
  u = u ** rng.uniform(0.8, 1.25)
  scale = np.ones(n)
  alpha = np.ones(n)
  turn = np.zeros(n)
  if pair in (0, 1):  # a translation right (pair 0) or down (pair 1)
    along, across = (w, h) if pair == 0 else (h, w)
    dist = min(rng.uniform(0.45, 0.7) * along, along - 2 * r - 1)
    start = rng.uniform(r, along - r - dist)
    pos = start + dist * u
    drift = rng.uniform(-0.1, 0.1) * across
    other = rng.uniform(r + abs(drift), across - r - abs(drift)) + drift * (u - 0.5)
    xs, ys = (pos, other) if pair == 0 else (other, pos)
  elif pair == 2:  # grow
    size = rng.uniform(0.08, 0.11)
    r = size * short
    size = (size - 0.08) / (0.11 - 0.08)
    scale = 1.0 + (rng.uniform(2.0, 2.8) - 1.0) * u
    rmax = r * scale[-1]
    xs = np.full(n, rng.uniform(rmax, w - rmax))
    ys = np.full(n, rng.uniform(rmax, h - rmax))
  elif pair == 3:  # a bar turning clockwise on screen (y points down) about its centre
    shape = "bar"
    size = rng.uniform(0.3, 0.4)
    r = size * short  # half its length
    size = (size - 0.3) / (0.4 - 0.3)
    xs = np.full(n, rng.uniform(r, w - r))
    ys = np.full(n, rng.uniform(r, h - r))
    turn = rng.uniform(0.5, 0.8) * math.pi * u  # < pi: a bar looks the same turned by pi
  else:  # appear: fade in, starting and ending at random times
    xs = np.full(n, rng.uniform(r, w - r))
    ys = np.full(n, rng.uniform(r, h - r))
    a, b = sorted(rng.uniform(0.0, 1.0, size=2) * np.array([0.4, 0.4]) + [0.0, 0.6])
    alpha = np.clip((u - a) / max(b - a, 1e-3), 0.0, 1.0)
  noise = rng.uniform(2.0, 5.0)
  frames = np.repeat(bg[None], n, axis=0)
  for t in range(n):
    draw(frames[t], shape, xs[t], ys[t], r * scale[t], angle0 + turn[t], colour)
  a = alpha.astype(np.float32)[:, None, None, None]
  frames = a * frames + (1.0 - a) * bg
  frames += np.float32(noise) * rng.standard_normal(frames.shape, dtype=np.float32)
  mid = (n - 1) // 2 if n % 2 else None  # a twin's middle is the same frame
  x_mid = xs[mid] if mid is not None else (xs[n // 2 - 1] + xs[n // 2]) / 2
  y_mid = ys[mid] if mid is not None else (ys[n // 2 - 1] + ys[n // 2]) / 2
  scene = Scene(shape, colour, float(size), (float(x_mid) / w, float(y_mid) / h))
  return np.clip(frames, 0, 255).astype(np.uint8), scene


def make_video(label: int, num_frames: int, height: int, width: int,
               rng: np.random.Generator) -> np.ndarray:
  """A video of class `label`: its pair's forward motion, reversed for the second class."""
  video = render_video(label // 2, num_frames, height, width, rng)
  return video[::-1] if label % 2 else video


class SyntheticMotion(base.VideoBuilder, skip_registration=True):
  """The embedded dataset. Prepared in seconds; `resize_short` does not apply (frames are
  rendered at `height x width`).

  A variant (`synthetic_long`) subclasses it with its own `name`, `VERSION`,
  `CLASS_NAMES`, `MIN_FRAMES` and `make_video(label, num_frames, height, width, rng)`.
  """

  name = "synthetic_motion"
  CLASS_NAMES = CLASS_NAMES
  MIN_FRAMES = 1
  make_video = staticmethod(make_video)
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Orbit for pair 3, object spin and a static distractor as nuisances.",
      "2.0.0": "A bar turning about its centre for pair 3; no spin, no distractor; larger "
               "growing objects.",
  }

  def __init__(self, *, data_dir: str, train_per_class: int = 120, val_per_class: int = 25,
               num_frames: int = 24, height: int = 40, width: int = 48, seed: int = 0,
               jpeg_quality: int = 90, **unused):
    del unused  # resize_short, num_workers, ...: not used here
    self.per_class = {"train": int(train_per_class), "val": int(val_per_class)}
    self.frames, self.height, self.width = int(num_frames), int(height), int(width)
    if (min(self.per_class.values()) < 1 or self.frames < self.MIN_FRAMES
        or min(height, width) < 8):
      raise ValueError(f"{self.name} needs >= 1 video per class, >= {self.MIN_FRAMES} "
                       f"frames (config.data.synthetic.num_frames) and frames of at least "
                       f"8x8, got {self.per_class}, {num_frames}, {height}x{width}.")
    self.seed = int(seed)
    super().__init__(data_dir=data_dir, resize_short=0, jpeg_quality=jpeg_quality,
                     train_per_class=train_per_class, val_per_class=val_per_class,
                     num_frames=num_frames, height=height, width=width, seed=seed)

  @classmethod
  def config_name_for(cls, *, train_per_class: int, val_per_class: int, num_frames: int,
                      height: int, width: int, seed: int, **unused) -> str:
    del unused
    return (f"train{train_per_class}_val{val_per_class}_f{num_frames}_{height}x{width}_"
            f"seed{seed}")

  def class_names(self) -> tuple[str, ...]:
    return self.CLASS_NAMES

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_synthetic(split) for split in SPLITS}

  def _generate_synthetic(self, split: str):
    split_id = SPLITS.index(split)
    for label in range(len(self.CLASS_NAMES)):
      for i in range(self.per_class[split]):
        index = label * self.per_class[split] + i
        rng = np.random.default_rng([self.seed, split_id, index])
        video = self.make_video(label, self.frames, self.height, self.width, rng)
        frames = [transforms.encode_jpeg(f, self.jpeg_quality) for f in video]
        yield index, {"frames": np.array(frames, dtype=object), "num_frames": len(frames),
                      "label": label, "video_id": f"{split}/{self.CLASS_NAMES[label]}/{i:05d}"}
