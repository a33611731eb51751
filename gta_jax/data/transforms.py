"""Frame decoding and the spatial transforms of DESIGN.md "Frame sampling".

All transforms act on a clip `(T, H, W, 3)` of uint8 RGB frames and apply ONE set of
crop/flip parameters to every frame of the clip. Normalisation (`normalize`) is left to
the consumer (the jitted step), so that uint8 travels to the device.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

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


def decode_frames(jpegs: Sequence[bytes], indices: np.ndarray) -> np.ndarray:
  """Decodes only `jpegs[i]` for `i` in `indices` (each distinct frame once): `(T, H, W, 3)`."""
  unique, inverse = np.unique(np.asarray(indices), return_inverse=True)
  decoded = np.stack([decode_jpeg(jpegs[int(i)]) for i in unique])
  return decoded[inverse.reshape(-1)]


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
  """Crops every frame at the same box and resizes it to `size x size`."""
  box = clip[:, top:top + crop_h, left:left + crop_w]
  if crop_h == size and crop_w == size:
    return np.ascontiguousarray(box)
  # Bilinear, as TSN's (PIL) resize; the crops are within 2x of `size`, where cv2's
  # INTER_AREA costs twice as much for the same result.
  return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in box])


def train_transform(clip: np.ndarray, crop_size: int, scales: Sequence[float], flip: bool,
                    rng: np.random.Generator) -> np.ndarray:
  """Multi-scale crop + resize to `crop_size` + optional horizontal flip, one draw per clip."""
  top, left, ch, cw = multiscale_crop_params(clip.shape[1], clip.shape[2], crop_size,
                                             scales, rng)
  out = crop_resize(clip, top, left, ch, cw, crop_size)
  if flip and rng.random() < 0.5:
    out = out[:, :, ::-1]
  return np.ascontiguousarray(out)


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
