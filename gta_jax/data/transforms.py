"""Frame decoding and the spatial transforms of DESIGN.md "Frame sampling".

All transforms act on a clip `(T, H, W, 3)` of uint8 RGB frames and apply ONE set of
crop/flip parameters to every frame of the clip. Normalisation (`normalize`) is left to
the consumer (the jitted step), so that uint8 travels to the device.

A training clip is made from the JPEG bytes in one pass (`train_clip`): the crop is
drawn from the JPEG header's size; libjpeg-turbo (simplejpeg) decodes each sampled frame
once, at the smallest DCT scale that still leaves the crop at least the output's
pixels (`decode_scale`); each frame is resized once, into the clip's buffer; the flip
is done in place.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import simplejpeg

# ImageNet statistics, RGB, on the 0..255 scale (torchvision's, times 255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

cv2.setNumThreads(1)  # one pipeline worker = one core


def normalize(video):
  """uint8 `(..., 3)` -> float32 `(x - mean) / std`; numpy in, numpy out; jax in, jax out."""
  if isinstance(video, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # pylint: disable=g-import-not-at-top
  mean = xp.asarray(IMAGENET_MEAN, dtype=xp.float32)
  std = xp.asarray(IMAGENET_STD, dtype=xp.float32)
  return (xp.asarray(video).astype(xp.float32) - mean) / std


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
  """RGB uint8 `(H, W, 3)` -> JPEG bytes."""
  ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]),
                         [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise ValueError(f"JPEG encoding failed for a frame of shape {frame.shape}.")
  return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG (or PNG) bytes -> RGB uint8 `(H, W, 3)`."""
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if img is None:
    raise ValueError("cannot decode the image bytes")
  return img[..., ::-1]


# libjpeg-turbo's DCT scales that decode faster than the full size (per 256x340 frame,
# single-threaded: 1/2 and 1/4 take 0.6-0.75x the time of a full decode, while 7/8, 3/4
# and 5/8 take 1.1-2x: they have no SIMD code).
DECODE_SCALES = (0.125, 0.25, 0.5)


def jpeg_size(data: bytes) -> tuple[int, int]:
  """`(height, width)` of a JPEG, from its header."""
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError as e:
    raise ValueError(f"cannot read the JPEG header of a {len(data)}-byte frame: {e}") from e
  return height, width


def decode_scale(box: tuple[int, int, int, int], size: int) -> float:
  """The DCT scale at which to decode frames for a crop `(top, left, h, w)` resized to `size`.

  The smallest of `DECODE_SCALES` at which the crop keeps at least `size` pixels each way
  (so the one resize never enlarges beyond what the full-size crop would) and integer
  corners (so cv2's resize of the scaled crop samples the same points as a resize of the
  full-size one); 1 when there is none.
  """
  for scale in DECODE_SCALES:
    if min(box[2:]) * scale >= size and all(float(v * scale).is_integer() for v in box):
      return scale
  return 1.0


def short_side_scale(height: int, width: int, short: int) -> float:
  """The DCT scale at which to decode a frame whose short side will be resized to `short`.

  The smallest of `DECODE_SCALES` that leaves the short side at least `short` and both
  sides whole (so the scaled frame covers exactly the stored one); 1 when there is none.
  """
  for scale in DECODE_SCALES:
    if (min(height, width) * scale >= short and float(height * scale).is_integer()
        and float(width * scale).is_integer()):
      return scale
  return 1.0


def decode_frames(jpegs: Sequence[bytes], indices: np.ndarray,
                  scale: float = 1.0) -> np.ndarray:
  """Decodes only `jpegs[i]` for `i` in `indices` (each distinct frame once).

  Returns `(T, ceil(H * scale), ceil(W * scale), 3)` uint8 RGB; `scale` is 1 or one of
  `DECODE_SCALES` (libjpeg-turbo's DCT-domain scaling). Every frame must have the size
  of the first one.
  """
  indices = np.asarray(indices)
  unique, inverse = np.unique(indices, return_inverse=True)
  height, width = jpeg_size(jpegs[int(unique[0])])
  shape = (math.ceil(height * scale), math.ceil(width * scale), 3)
  out = np.empty((len(unique),) + shape, np.uint8)
  for frame, i in zip(out, unique):
    data = jpegs[int(i)]
    if jpeg_size(data) != (height, width):
      raise ValueError(f"frame {int(i)} is {jpeg_size(data)} (height, width), frame "
                       f"{int(unique[0])} of the same video is {(height, width)}.")
    simplejpeg.decode_jpeg(data, "rgb", min_height=shape[0], min_width=shape[1],
                           buffer=frame)
  if np.array_equal(unique, indices):  # sorted and distinct: the usual case, no copy
    return out
  return out[inverse.reshape(-1)]


def resize_short_side(frame: np.ndarray, short: int) -> np.ndarray:
  """Resizes so that min(H, W) == short, keeping the aspect ratio (rounded)."""
  h, w = frame.shape[:2]
  if min(h, w) == short:
    return frame
  if h <= w:
    size = (max(1, int(round(w * short / h))), short)
  else:
    size = (short, max(1, int(round(h * short / w))))
  interp = cv2.INTER_AREA if short < min(h, w) else cv2.INTER_LINEAR
  return cv2.resize(frame, size, interpolation=interp)


def resize_clip_short_side(clip: np.ndarray, short: int) -> np.ndarray:
  if min(clip.shape[1:3]) == short:
    return clip
  return np.stack([resize_short_side(f, short) for f in clip])


def multiscale_crop_params(height: int, width: int, crop_size: int,
                           scales: Sequence[float], rng: np.random.Generator,
                           max_distort: int = 1) -> tuple[int, int, int, int]:
  """TSN's GroupMultiScaleCrop: `(top, left, crop_h, crop_w)` for one clip.

  Candidate sides are `int(short_side * s)` for each scale (snapped to `crop_size` when
  within 3 pixels); a (height, width) pair is drawn among those whose scale indices differ
  by at most `max_distort`, then an offset among the 13 fixed positions (4 corners,
  centre, 4 edge centres, 4 quarter points).
  """
  base = min(height, width)
  sizes = [int(base * s) for s in scales]
  sizes = [crop_size if abs(s - crop_size) < 3 else s for s in sizes]
  pairs = [(sizes[i], sizes[j]) for i in range(len(sizes)) for j in range(len(sizes))
           if abs(i - j) <= max_distort]
  crop_h, crop_w = pairs[int(rng.integers(len(pairs)))]
  crop_h, crop_w = min(max(crop_h, 1), height), min(max(crop_w, 1), width)
  hs, ws = (height - crop_h) // 4, (width - crop_w) // 4
  offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),
             (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),
             (1 * hs, 1 * ws), (1 * hs, 3 * ws), (3 * hs, 1 * ws), (3 * hs, 3 * ws)]
  top, left = offsets[int(rng.integers(len(offsets)))]
  return top, left, crop_h, crop_w


def crop_resize(clip: np.ndarray, top: int, left: int, crop_h: int, crop_w: int,
                size: int) -> np.ndarray:
  """Crops every frame at the same box and resizes it to `size x size`, into a new clip."""
  out = np.empty((len(clip), size, size, clip.shape[-1]), np.uint8)
  for frame, dst in zip(clip[:, top:top + crop_h, left:left + crop_w], out):
    if crop_h == size and crop_w == size:
      dst[...] = frame
    else:
      # Bilinear, as TSN's (PIL) resize; the crops are within 2x of `size`, where cv2's
      # INTER_AREA costs twice as much for the same result.
      cv2.resize(frame, (size, size), dst=dst, interpolation=cv2.INTER_LINEAR)
  return out


def flip_clip(clip: np.ndarray) -> np.ndarray:
  """Flips every frame of a clip horizontally, in place, and returns it.

  In place with cv2: numpy's `[:, :, ::-1]` copy of a 8x224 clip costs about 4 ms.
  """
  for frame in clip:
    cv2.flip(frame, 1, dst=frame)
  return clip


def train_crop(height: int, width: int, crop_size: int, scales: Sequence[float],
               flip: bool, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
  """One clip's random draws: its crop box `(top, left, h, w)`, then whether it flips."""
  box = multiscale_crop_params(height, width, crop_size, scales, rng)
  return box, bool(flip and rng.random() < 0.5)


def train_clip(jpegs: Sequence[bytes], indices: np.ndarray, crop_size: int,
               scales: Sequence[float], flip: bool, rng: np.random.Generator) -> np.ndarray:
  """Frames `indices` of a video -> multi-scale crop, resized to `crop_size`, maybe flipped.

  One crop (drawn from the frames' stored size) and one flip per clip. The frames are
  decoded at `decode_scale` of the crop: at full size the clip is the cv2 decoder's,
  and at a DCT scale it is that decoder's frames box-filtered to the scale, then cropped
  and resized, within JPEG rounding (tests/test_data_pipeline.py). Returns
  `(T, crop_size, crop_size, 3)` uint8.
  """
  box, flipped = train_crop(*jpeg_size(jpegs[int(indices[0])]), crop_size, scales, flip, rng)
  scale = decode_scale(box, crop_size)
  clip = crop_resize(decode_frames(jpegs, indices, scale),
                     *(int(v * scale) for v in box), crop_size)
  if flipped:
    flip_clip(clip)
  return clip


def eval_crops(clip: np.ndarray, crop_size: int, test_scale: int,
               num_crops: int) -> np.ndarray:
  """Short side to `test_scale`, then a centre crop (1) or 3 crops along the long side.

  Returns `(num_crops, T, crop_size, crop_size, 3)`. With 3 crops: left/centre/right for
  landscape frames, top/centre/bottom for portrait ones, centred across the short side.
  """
  if num_crops not in (1, 3):
    raise ValueError(f"eval.num_crops must be 1 or 3, got {num_crops}.")
  clip = resize_clip_short_side(clip, test_scale)
  h, w = clip.shape[1:3]
  if min(h, w) < crop_size:  # test_scale < crop_size: upsample so that a crop fits
    clip = resize_clip_short_side(clip, crop_size)
    h, w = clip.shape[1:3]
  cy, cx = (h - crop_size) // 2, (w - crop_size) // 2
  if num_crops == 1:
    boxes = [(cy, cx)]
  elif w >= h:
    boxes = [(cy, 0), (cy, cx), (cy, w - crop_size)]
  else:
    boxes = [(0, cx), (cy, cx), (h - crop_size, cx)]
  return np.stack([clip[:, y:y + crop_size, x:x + crop_size] for y, x in boxes])
