"""Reading videos (PyAV) and frame folders (cv2) into RGB frames, at preparation time.

Light on imports (no tfds): preparation's worker processes import only this module.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

from gta_jax.data import transforms

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".ogv", ".3gp", ".wmv")


@dataclasses.dataclass(frozen=True)
class VideoItem:
  """One video to prepare: a video file or a folder of frames, with its label index.

  A captioned dataset's item also carries its captions and, for a clip cut from a
  longer video file, the segment `[start, end)` in seconds (-1: from the start / to
  the end).
  """
  path: str
  label: int
  video_id: str
  captions: tuple[str, ...] = ()
  start: float = -1.0
  end: float = -1.0


def read_video(path: str, start: float = -1.0, end: float = -1.0) -> list[np.ndarray]:
  """The frames of the first video stream of `path`, RGB uint8.

  With `start >= 0` and/or `end >= 0` (seconds), only the frames whose presentation
  time lies in `[start, end)`: the decoder seeks to the key frame before `start`.
  Raises on a broken file.
  """
  import av  # pylint: disable=g-import-not-at-top  (only preparation decodes videos)
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    if start > 0 and stream.time_base:
      container.seek(int(start / stream.time_base), stream=stream, backward=True)
    frames = []
    for frame in container.decode(stream):
      t = frame.time
      if t is not None and 0 <= end <= t:
        break
      if t is None or t >= start:
        frames.append(frame.to_ndarray(format="rgb24"))
    return frames


def list_frames(folder: str) -> list[str]:
  names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)]
  return [os.path.join(folder, n) for n in sorted(names)]


def read_frame_folder(folder: str) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
  """The frames of a frame folder in file-name order, and the unreadable ones (skipped)."""
  frames, bad = [], []
  for path in list_frames(folder):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
      bad.append((path, "cannot decode the image"))
    else:
      frames.append(img[..., ::-1])
  return frames, bad


def encode_frames(frames: list[np.ndarray], resize_short: int, quality: int) -> list[bytes]:
  """Resizes each frame's short side to `resize_short` (0 keeps the size) and JPEG-encodes.

  Every frame comes out the size of the first one, so that a clip's frames stack (a
  frame folder may mix sizes).
  """
  out, size = [], None
  for f in frames:
    if resize_short:
      f = transforms.resize_short_side(f, resize_short)
    if size is None:
      size = f.shape[:2]
    elif f.shape[:2] != size:
      f = cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    out.append(transforms.encode_jpeg(f, quality))
  return out


def load_video(item: VideoItem, *, resize_short: int, jpeg_quality: int):
  """Reads a video file or frame folder -> (jpeg list, bad frames, error or None).

  Never raises: a video that cannot be read comes back with its error message.
  """
  try:
    if os.path.isdir(item.path):
      frames, bad = read_frame_folder(item.path)
    else:
      frames, bad = read_video(item.path, item.start, item.end), []
    if not frames:
      segment = f" in [{item.start}, {item.end}) s" if max(item.start, item.end) >= 0 else ""
      return None, bad, f"no decodable frames{segment}"
    return encode_frames(frames, resize_short, jpeg_quality), bad, None
  except Exception as e:  # pylint: disable=broad-except
    return None, [], f"{type(e).__name__}: {e}"
