"""`synthetic_captions`: the embedded dataset with captions, for text-video retrieval.

Each draw of `synthetic_motion`'s generator (a random scene and a forward motion of one
of its five pairs) is stored twice in its split: played forwards (the pair's first
class) and backwards, its time-reversed twin (the second class). Every video is
captioned from its own draw: the motion, and what a frame shows, the object's shape,
colour name, size and place in the frame ("a large red square in the top left
slides to the right"). The twins' captions differ in the motion words only.

So appearance finds a video's twin pair, and only frame order tells the two apart: an
order-blind video model gives both twins the same embedding, a tie that counts
against it, while a model that sees order can rank the right twin first.

Training videos get `train_captions` phrasings each (different templates and
synonyms), validation videos one. Deterministic from the seed: draw `i` of pair `p`
in a split uses `default_rng([seed, split, p, i, 1])`, its captions
`default_rng([seed, split, p, i, 2])`.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow_datasets as tfds

from gta_jax.data import transforms
from gta_jax.data.builders import base
from gta_jax.data.builders import synthetic_motion as sm

SPLITS = ("train", "val")

# Each class's motion phrases (the synonyms a caption draws from).
MOTIONS = {
    "moving_right": ("moves to the right", "slides right", "goes from left to right"),
    "moving_left": ("moves to the left", "slides left", "goes from right to left"),
    "moving_down": ("moves down", "falls", "goes from top to bottom"),
    "moving_up": ("moves up", "rises", "goes from bottom to top"),
    "growing": ("grows", "gets bigger", "expands"),
    "shrinking": ("shrinks", "gets smaller", "contracts"),
    "rotating_clockwise": ("turns clockwise", "rotates clockwise", "spins clockwise"),
    "rotating_anticlockwise": ("turns anticlockwise", "rotates counterclockwise",
                               "spins anticlockwise"),
    "appearing": ("appears", "fades in", "comes into view"),
    "vanishing": ("vanishes", "fades out", "disappears"),
}
COLOURS = {  # name -> a reference RGB; a colour is named by the nearest
    "red": (220, 30, 30), "orange": (240, 140, 20), "yellow": (235, 225, 40),
    "green": (40, 190, 50), "cyan": (40, 210, 220), "blue": (40, 60, 220),
    "purple": (140, 40, 200), "pink": (240, 120, 190), "white": (245, 245, 245),
    "black": (15, 15, 15), "grey": (128, 128, 128), "brown": (130, 80, 30),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
_TEMPLATES = (
    "a {size} {colour} {shape} {place} {motion}",
    "the {colour} {shape} {place} {motion}; it is {size}",
    "{place_cap}, a {size} {shape} in {colour} {motion}",
    "a {colour} {shape} {motion} {place}, {size}",
)


def colour_name(rgb) -> str:
  """The name in `COLOURS` nearest to an RGB colour."""
  names = list(COLOURS)
  ref = np.array([COLOURS[n] for n in names], np.float64)
  return names[int(np.argmin(((ref - np.asarray(rgb, np.float64)) ** 2).sum(-1)))]


def place(position) -> str:
  """'top left' ... 'bottom right' ('centre' in the middle) from `(x / W, y / H)`."""
  row = ROWS[min(int(position[1] * 3), 2)]
  column = COLUMNS[min(int(position[0] * 3), 2)]
  if row == "middle":
    return "centre" if column == "centre" else f"middle {column}"
  return f"{row} {column}" if column != "centre" else f"{row} centre"


def attributes(scene: sm.Scene, label: int) -> dict[str, str]:
  """The words a caption of this video is made of: motion class, shape, colour, size,
  place."""
  return {"motion": sm.CLASS_NAMES[label], "shape": scene.shape,
          "colour": colour_name(scene.colour), "size": SIZES[int(scene.size >= 0.5)],
          "place": place(scene.position)}


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
  """One phrasing of a video's attributes: a random template and motion synonym."""
  template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
  motion = MOTIONS[attrs["motion"]][int(rng.integers(len(MOTIONS[attrs["motion"]])))]
  where = f"in the {attrs['place']}"
  text = template.format(size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"],
                         motion=motion, place=where, place_cap=where.capitalize())
  return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "an orange"


def parse_caption(text: str) -> dict[str, str]:
  """The attributes a caption names (the inverse of :func:`caption`, for the oracle)."""
  out = {}
  for label, phrases in MOTIONS.items():
    if any(p in text for p in phrases):
      out["motion"] = label
  words = set(re.findall(r"[\w']+", text))
  for key, names in (("shape", sm.SHAPES + ("bar",)), ("colour", tuple(COLOURS)),
                     ("size", SIZES)):
    found = [n for n in names if n in words]
    if found:
      out[key] = found[0]
  where = re.findall(r"[\w']+", text.lower().split("in the ", 1)[-1])
  if "in the " in text.lower() and where:
    out["place"] = where[0] if where[0] == "centre" else " ".join(where[:2])
  return out


class SyntheticCaptions(base.VideoBuilder, skip_registration=True):
  """The embedded captioned dataset (see the module docstring). `train_per_class` and
  `val_per_class` are draws per pair: each gives one video of each of the pair's two
  classes."""

  name = "synthetic_captions"
  VERSION = tfds.core.Version("1.0.0")
  CAPTIONED = True

  def __init__(self, *, data_dir: str, train_per_class: int = 120, val_per_class: int = 25,
               num_frames: int = 24, height: int = 40, width: int = 48, seed: int = 0,
               train_captions: int = 4, jpeg_quality: int = 90, **unused):
    del unused  # resize_short, num_workers, ...: not used here
    self.per_class = {"train": int(train_per_class), "val": int(val_per_class)}
    self.captions_per_video = {"train": int(train_captions), "val": 1}
    self.frames, self.height, self.width = int(num_frames), int(height), int(width)
    if min(self.per_class.values()) < 1 or self.frames < 1 or min(height, width) < 8 \
        or self.captions_per_video["train"] < 1:
      raise ValueError("synthetic_captions needs >= 1 draw per class, >= 1 frame, >= 1 "
                       f"training caption and frames of at least 8x8, got {self.per_class}, "
                       f"{num_frames}, {train_captions}, {height}x{width}.")
    self.seed = int(seed)
    super().__init__(data_dir=data_dir, resize_short=0, jpeg_quality=jpeg_quality,
                     train_per_class=train_per_class, val_per_class=val_per_class,
                     num_frames=num_frames, height=height, width=width, seed=seed,
                     train_captions=train_captions)

  @classmethod
  def config_name_for(cls, *, train_captions: int = 4, **params) -> str:
    return f"{sm.SyntheticMotion.config_name_for(**params)}_cap{train_captions}"

  def class_names(self) -> tuple[str, ...]:
    return sm.CLASS_NAMES

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_captioned(split) for split in SPLITS}

  def _generate_captioned(self, split: str):
    split_id = SPLITS.index(split)
    draws = self.per_class[split]
    for pair in range(len(sm.PAIRS)):
      for i in range(draws):
        video, scene = sm.render_scene(
            pair, self.frames, self.height, self.width,
            np.random.default_rng([self.seed, split_id, pair, i, 1]))
        text_rng = np.random.default_rng([self.seed, split_id, pair, i, 2])
        for direction, frames in enumerate((video, video[::-1])):
          label = 2 * pair + direction
          attrs = attributes(scene, label)
          captions = [caption(attrs, text_rng)
                      for _ in range(self.captions_per_video[split])]
          jpegs = [transforms.encode_jpeg(f, self.jpeg_quality) for f in frames]
          index = 2 * (pair * draws + i) + direction
          item = base.VideoItem("", label, f"{split}/{pair}/{i:05d}/"
                                f"{('forward', 'reverse')[direction]}", tuple(captions))
          yield index, {"frames": np.array(jpegs, dtype=object), "num_frames": len(jpegs),
                        "label": label, "video_id": item.video_id,
                        **base.caption_fields(item)}
