"""Which frames of a video make a clip (0-based indices), as in DESIGN.md "Frame sampling".

Two conventions:

* `segment_indices`: TSN/TSM segment sampling. The video is split into `T` equal segments
  and one frame is taken from each: a random one in training, the centre at test (or one of
  `V` evenly spaced offsets inside every segment for `V` temporal views).
* `clip_indices`: dense clips for 3D networks: `clip_len` frames every `frame_interval`,
  from a random start in training or from `V` evenly spaced starts at test; indices past
  the end of the video loop back to its start.

Both return `np.int64` arrays of length `T` (or `clip_len`), every index in `[0, n)`.
"""

from __future__ import annotations

import numpy as np


def _check(num_frames: int, length: int, train: bool, rng, view: int, num_views: int) -> None:
  if num_frames <= 0:
    raise ValueError(f"A video needs at least one frame, got num_frames={num_frames}.")
  if length <= 0:
    raise ValueError(f"A clip needs at least one frame, got {length}.")
  if train and rng is None:
    raise ValueError("Training sampling is random: pass rng=np.random.Generator.")
  if num_views < 1 or not 0 <= view < num_views:
    raise ValueError(f"view must be in [0, num_views), got view={view}, num_views={num_views}.")


def segment_indices(num_frames: int, num_segments: int, *, train: bool,
                    rng: np.random.Generator | None = None, view: int = 0,
                    num_views: int = 1) -> np.ndarray:
  """TSN segment sampling: one frame index per segment.

  Train (`n` frames, `T` segments): `avg = n // T`; if `avg > 0`, segment `x` gives
  `x * avg + randint(avg)`; elif `n > T`, `sorted(randint(n, size=T))`; else
  `floor(x * n / T)` (a video shorter than `T` repeats frames). The middle case is the
  TSM code's and cannot happen with one frame per segment (`avg == 0` means `n < T`); it is
  kept so that the formula reads as the reference does.

  Test, view `v` of `V`: `int(tick * (x + (v + 0.5) / V))` with `tick = n / T`; `V = 1`
  gives the segment centres `int(tick / 2 + tick * x)`.

  Args:
    num_frames: frames in the video, `n >= 1`.
    num_segments: `T`, the clip length.
    train: random (train) or deterministic (test) sampling.
    rng: the random generator, required when `train`.
    view: which of the `num_views` temporal views (test only).
    num_views: `V`, the temporal views at test.

  Returns:
    `np.int64` indices, shape `(T,)`, non-decreasing.
  """
  n, t = int(num_frames), int(num_segments)
  _check(n, t, train, rng, view, num_views)
  x = np.arange(t, dtype=np.int64)
  if train:
    avg = n // t
    if avg > 0:
      return x * avg + rng.integers(avg, size=t)
    if n > t:  # unreachable for one frame per segment; see the docstring
      return np.sort(rng.integers(n, size=t)).astype(np.int64)
    return (x * n) // t
  tick = n / t
  idx = np.array([int(tick * (i + (view + 0.5) / num_views)) for i in range(t)], np.int64)
  return np.minimum(idx, n - 1)


def clip_indices(num_frames: int, clip_len: int, frame_interval: int, *, train: bool,
                 rng: np.random.Generator | None = None, view: int = 0,
                 num_views: int = 1) -> np.ndarray:
  """Dense clip sampling: `clip_len` frames every `frame_interval` frames.

  The clip spans `span = clip_len * frame_interval` frames; `max_offset = max(n - span, 0)`.
  Train: a start drawn uniformly from `[0, max_offset]`. Test, view `v` of `V`: the start
  `round(v * max_offset / (V - 1))`, or `max_offset // 2` (the centre) when `V = 1`.
  Indices past the end of a short video loop: `(start + i * frame_interval) % n`.

  Returns:
    `np.int64` indices, shape `(clip_len,)`.
  """
  n, length, step = int(num_frames), int(clip_len), int(frame_interval)
  _check(n, length, train, rng, view, num_views)
  if step < 1:
    raise ValueError(f"frame_interval must be >= 1, got {frame_interval}.")
  max_offset = max(n - length * step, 0)
  if train:
    start = int(rng.integers(max_offset + 1))
  elif num_views == 1:
    start = max_offset // 2
  else:
    start = int(round(view * max_offset / (num_views - 1)))
  return (start + np.arange(length, dtype=np.int64) * step) % n
