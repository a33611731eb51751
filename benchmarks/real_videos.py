r"""A folder of real H.264 video files in 10 classes of reversed pairs, for `video_folder`.

    python benchmarks/real_videos.py --out=/tmp/real_videos [--train_per_class=120]

The embedded `synthetic_motion` dataset is drawn shapes stored as JPEG frames; this
folder checks the same claim on what users bring: `.mp4` files (H.264, yuv420p)
that go through PyAV decoding and the `video_folder` builder. Each video is a
virtual camera moving over a real photograph (the two photos matplotlib ships:
Grace Hopper's portrait and a product shot), with a random crop, scale, flip,
colour gain and speed per video. The five pairs mirror the embedded dataset's:

  moves_right / moves_left, moves_down / moves_up, grows / shrinks,
  turns_clockwise / turns_anticlockwise, brightens / darkens.

A video of a pair's second class is an independent draw of the first class's
motion, played backwards: the frames of the two classes have the same distribution,
so a model blind to frame order (TSN) is at chance within each pair.
Deterministic from the seed; the layout is `<out>/{train,val}/<class>/<i>.mp4`. With
`--captions`, `<out>/{train,val}.csv` caption each video with what its photo shows and
its class's motion ("a blue gift box turns clockwise"), for `captioned_folder`.
"""

import csv
import math
import os

from absl import app
from absl import flags
import av
import cv2
import matplotlib
import numpy as np

PAIRS = (("moves_right", "moves_left"), ("moves_down", "moves_up"),
         ("grows", "shrinks"), ("turns_clockwise", "turns_anticlockwise"),
         ("brightens", "darkens"))
CLASS_NAMES = tuple(name for pair in PAIRS for name in pair)
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


def load_photos() -> list[np.ndarray]:
  """The RGB uint8 photographs of matplotlib's sample data."""
  folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
  photos = []
  for name in PHOTOS:
    image = cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR)
    if image is None:
      raise FileNotFoundError(f"cannot read the photo {os.path.join(folder, name)}")
    photos.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
  return photos


def camera_frames(photo: np.ndarray, pair: int, rng: np.random.Generator, *,
                  num_frames: int, width: int, height: int) -> list[np.ndarray]:
  """Frames of the first class of `pair`: a camera moving over `photo`.

  Frame `t` samples the photo through an affine map: output pixel `p` shows photo
  point `centre(t) + zoom(t) * R(angle(t)) (p - frame centre)`.
  """
  if rng.random() < 0.5:  # mirror the photo, not the frames: motion keeps its direction
    photo = photo[:, ::-1]
  ph, pw = photo.shape[:2]
  zoom = rng.uniform(0.35, 0.6) * min(ph / height, pw / width)  # photo px per output px
  u = np.linspace(0.0, 1.0, num_frames)
  cx = np.full(num_frames, pw / 2 + rng.uniform(-0.15, 0.15) * pw)
  cy = np.full(num_frames, ph / 2 + rng.uniform(-0.15, 0.15) * ph)
  zooms = np.full(num_frames, zoom)
  angles = np.zeros(num_frames)
  gains = np.ones(num_frames)
  if pair in (0, 1):  # the scene moves right (down): the camera moves left (up)
    travel = rng.uniform(0.25, 0.45) * (width if pair == 0 else height) * zoom
    (cx if pair == 0 else cy)[:] -= (u - 0.5) * travel
  elif pair == 2:  # the scene grows: the camera zooms in
    zooms = zoom / (1.0 + rng.uniform(0.5, 0.9) * u)
  elif pair == 3:  # the scene turns clockwise on screen (y down): the camera turns back
    angles = -rng.uniform(math.radians(50), math.radians(90)) * u
  else:  # the scene brightens
    gains = rng.uniform(0.15, 0.35) + (1.0 - rng.uniform(0.15, 0.35)) * u
  colour = rng.uniform(0.8, 1.2, size=3)
  frames = []
  for t in range(num_frames):
    c, s = math.cos(angles[t]) * zooms[t], math.sin(angles[t]) * zooms[t]
    # dst -> src: x_src = c*(x - w/2) - s*(y - h/2) + cx, y_src = s*(x - w/2) + c*(y - h/2) + cy
    matrix = np.array([[c, -s, cx[t] - c * width / 2 + s * height / 2],
                       [s, c, cy[t] - s * width / 2 - c * height / 2]])
    frame = cv2.warpAffine(photo, matrix, (width, height),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT)
    frame = np.clip(frame * (colour * gains[t]), 0, 255).astype(np.uint8)
    frames.append(frame)
  return frames


def write_mp4(path: str, frames: list[np.ndarray], fps: int = 12) -> None:
  """Encodes RGB frames as H.264 (yuv420p) with PyAV."""
  with av.open(path, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


# A caption of each video for `captioned_folder` (text-video retrieval): what the
# photo shows and the class's motion.
PHOTO_WORDS = ("a portrait of a woman in uniform", "a blue gift box")
MOTION_WORDS = {
    "moves_right": "moves to the right", "moves_left": "moves to the left",
    "moves_down": "moves down", "moves_up": "moves up", "grows": "gets bigger",
    "shrinks": "gets smaller", "turns_clockwise": "turns clockwise",
    "turns_anticlockwise": "turns anticlockwise", "brightens": "gets brighter",
    "darkens": "gets darker"}


def make_folder(out: str, *, train_per_class: int = 120, val_per_class: int = 25,
                num_frames: int = 24, width: int = 96, height: int = 72,
                seed: int = 0, captions: bool = False) -> None:
  """Writes the dataset under `out` (a video that already exists is kept); with
  `captions`, also `<split>.csv` lists of `path,caption` for `captioned_folder`."""
  photos = load_photos()
  for split_index, (split, count) in enumerate((("train", train_per_class),
                                                ("val", val_per_class))):
    rows = [("path", "caption")]
    for label, name in enumerate(CLASS_NAMES):
      folder = os.path.join(out, split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        path = os.path.join(folder, f"{i:04d}.mp4")
        rng = np.random.default_rng([seed, split_index, label, i])
        photo = int(rng.integers(len(photos)))
        rows.append((os.path.relpath(path, out),
                     f"{PHOTO_WORDS[photo]} {MOTION_WORDS[name]}"))
        if os.path.exists(path):
          continue
        frames = camera_frames(photos[photo], label // 2, rng, num_frames=num_frames,
                               width=width, height=height)
        write_mp4(path + ".part", frames[::-1] if label % 2 else frames)
        os.replace(path + ".part", path)
    if captions:
      with open(os.path.join(out, f"{split}.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  make_folder(f.out, train_per_class=f.train_per_class, val_per_class=f.val_per_class,
              seed=f.seed, captions=f.captions)
  print(f"wrote {len(CLASS_NAMES)} classes to {f.out}")


if __name__ == "__main__":
  # Defined here so that importing this module (benchmarks/ablations.py) adds no flags.
  flags.DEFINE_string("out", None, "Folder to write.", required=True)
  flags.DEFINE_integer("train_per_class", 120, "Training videos per class.")
  flags.DEFINE_integer("val_per_class", 25, "Validation videos per class.")
  flags.DEFINE_integer("seed", 0, "Seed of the draws.")
  flags.DEFINE_bool("captions", False, "Also write train.csv and val.csv of "
                    "'path,caption' rows for the captioned_folder dataset.")
  app.run(main)
