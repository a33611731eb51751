"""Captioned builders for text-video retrieval: a user's CSV, MSR-VTT and YouCook2.

Each example carries its captions (and, for a clip cut from a longer file, its segment
`[start, end)` in seconds); see `base` for the features and `captions.json`.
docs/data.md gives each layout.

* `captioned_folder`: `manual_dir/<split>.csv` (train required), header `path,caption`
  and optional `start,end` columns. Rows with the same `(path, start, end)` are one
  example whose captions are theirs in file order. One class, `video`.
* `msrvtt`: videos `video<N>.mp4` anywhere under `manual_dir`, annotations
  `train_val_videodatainfo.json` + `test_videodatainfo.json` or `MSRVTT_data.json`.
  Protocol `1k-A` (default): `train` = the 9,000 videos of `MSRVTT_train.9k.csv` with
  all their sentences, `test` = the 1,000 (video, sentence) pairs of
  `MSRVTT_JSFUSION_test.csv`; protocol `official`: `train`, `val`, `test` from the json
  `split` field. Classes: the 20 categories, `category00` ... `category19`.
* `youcook2`: `youcookii_annotations_trainval.json`, videos `<youtube id>.<ext>` anywhere
  under `manual_dir` (officially `raw_videos/<subset>/<recipe_type>/`). One example per
  annotated segment, video id `<youtube id>_<annotation id>`. Splits `train`, `val`;
  classes: the recipe types.

Bad input: a listed video missing on disk (or a bad CSV row) is logged, counted in
`prepare_report.json` and skipped; a missing folder or annotation file, a malformed
file, or a split none of whose videos is found is a ValueError naming it.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os

from gta_jax.data.builders import base
from gta_jax.data.builders import manual
from gta_jax.data.builders import video_folder


class CaptionedFolder(base.VideoBuilder, skip_registration=True):
  """A user's captioned videos (files or frame folders) from `<split>.csv` lists."""

  name = "captioned_folder"
  CAPTIONED = True
  CLASS_NAME = "video"

  def __init__(self, *, data_dir: str, manual_dir: str, folder_name: str = "", **kwargs):
    self.root = os.path.expanduser(manual_dir) if manual_dir else ""
    self._items = None
    super().__init__(data_dir=data_dir, manual_dir=manual_dir, folder_name=folder_name,
                     **kwargs)

  @classmethod
  def config_name_for(cls, *, manual_dir: str = "", folder_name: str = "",
                      resize_short: int = 256, **unused) -> str:
    del unused
    return video_folder.folder_config_name(cls.name, manual_dir, folder_name, resize_short)

  def class_names(self) -> tuple[str, ...]:
    return (self.CLASS_NAME,)

  def split_items(self) -> dict[str, list[base.VideoItem]]:
    if self._items is None:
      if not self.root or not os.path.isdir(self.root):
        raise ValueError(f"{self.name}: the folder {self.root!r} (config.data.manual_dir) "
                         "does not exist.")
      csvs = {n[:-4]: os.path.join(self.root, n) for n in sorted(os.listdir(self.root))
              if n.endswith(".csv") and not n.startswith((".", "_"))}
      if "train" not in csvs:
        raise ValueError(f"{self.name}: no train.csv in {self.root!r} (rows 'path,caption"
                         "[,start,end]'; docs/data.md describes the layout).")
      self._items = {split: self._read_csv(split, path) for split, path in csvs.items()}
    return self._items

  def _read_csv(self, split: str, path: str) -> list[base.VideoItem]:
    """One item per `(path, start, end)`, its captions in file order; bad rows skipped."""
    skipped = self.skipped.setdefault(split, base.Skipped())
    groups = {}  # (path, start, end) -> captions; dicts keep the first row's order
    num_rows = 0
    with open(path, newline="") as f:
      reader = csv.DictReader(f, skipinitialspace=True)
      columns = [c.strip().lower() for c in reader.fieldnames or ()]
      if not {"path", "caption"} <= set(columns):
        raise ValueError(f"{path}: expected a header 'path,caption' (and optionally "
                         f"'start,end'), got {','.join(reader.fieldnames or ())!r}.")
      reader.fieldnames = columns
      for row in reader:
        num_rows += 1
        where = f"{path}:{reader.line_num}"
        try:
          key, caption = self._parse_row(row)
        except ValueError as e:
          base.log.warning("Row skipped at %s: %s.", where, e)
          skipped.missing.append((where, str(e)))
          continue
        groups.setdefault(key, []).append(caption)
    if not groups:
      raise ValueError(f"{self.name}: none of the {num_rows} rows of {path!r} is usable "
                       f"(paths are relative to {self.root!r}; the skipped rows are logged "
                       "above).")
    items = []
    for (rel, start, end), captions in groups.items():
      video_id = rel if max(start, end) < 0 else f"{rel}@{start:g}-{end:g}"
      items.append(base.VideoItem(os.path.join(self.root, rel), 0, video_id,
                                  tuple(captions), start, end))
    return items

  def _parse_row(self, row: dict) -> tuple[tuple[str, float, float], str]:
    """`((path, start, end), caption)` of a CSV row; a ValueError saying what is wrong."""
    start, end = _seconds(row.get("start")), _seconds(row.get("end"))
    if 0 <= end <= max(start, 0):
      raise ValueError(f"start {max(start, 0):g} >= end {end:g}")
    caption = (row["caption"] or "").strip()
    if not caption:
      raise ValueError("empty caption")
    rel = (row["path"] or "").strip()
    full = os.path.join(self.root, rel)  # `rel` itself when absolute
    if not rel or not os.path.exists(full):
      raise ValueError(f"missing file {full}")
    return (rel, start, end), caption


def _seconds(value: str | None) -> float:
  """A CSV `start`/`end` cell in seconds; -1 for an empty (or absent) one."""
  value = (value or "").strip()
  if not value:
    return -1.0
  try:
    seconds = float(value)
  except ValueError:
    raise ValueError(f"unparseable time {value!r}") from None
  if not math.isfinite(seconds) or seconds < 0:
    raise ValueError(f"time {value!r} is not a non-negative number of seconds")
  return seconds


@dataclasses.dataclass(frozen=True)
class Clip:
  """One example as an annotation lists it, before its video file is looked up."""
  key: str  # the source video's file name without extension
  label: str
  video_id: str
  captions: tuple[str, ...]
  start: float = -1.0
  end: float = -1.0


class CaptionedManual(base.VideoBuilder, skip_registration=True):
  """Lists `Clip`s per split from annotations, then finds their videos by file name."""

  CAPTIONED = True

  def __init__(self, *, data_dir: str, manual_dir: str, **kwargs):
    self.root = os.path.expanduser(manual_dir) if manual_dir else ""
    self._listing = None
    super().__init__(data_dir=data_dir, **kwargs)

  @classmethod
  def config_name_for(cls, *, resize_short: int = 256, **unused) -> str:
    del unused
    return f"short{resize_short}"

  def annotations(self) -> tuple[tuple[str, ...], dict[str, list[Clip]]]:
    """`(class names, {split: [Clip]})`."""
    raise NotImplementedError

  def _list(self):
    if self._listing is not None:
      return self._listing
    if not self.root or not os.path.isdir(self.root):
      raise ValueError(f"{self.name}: the manual_dir {self.root!r} does not exist.")
    names, clips = self.annotations()
    index = {n: i for i, n in enumerate(names)}
    files = manual.index_videos(self.root)
    items = {}
    for split, split_clips in clips.items():
      skipped = self.skipped.setdefault(split, base.Skipped())
      items[split], missing_videos = [], set()
      for clip in split_clips:
        path = files.get(clip.key)
        if path is None:
          skipped.missing.append((clip.video_id, f"video {clip.key} not found"))
          if clip.key not in missing_videos:
            base.log.warning("%s/%s: video %s not found under %s; its clips are skipped.",
                             self.name, split, clip.key, self.root)
            missing_videos.add(clip.key)
        else:
          items[split].append(base.VideoItem(path, index[clip.label], clip.video_id,
                                             clip.captions, clip.start, clip.end))
      if split_clips and not items[split]:
        num_videos = len({clip.key for clip in split_clips})
        raise ValueError(f"{self.name}: none of the {num_videos} {split} videos was found "
                         f"under {self.root!r} ({len(files)} video files there).")
      if missing_videos:
        base.log.warning("%s/%s: %d of %d listed clips (%d videos) are missing; the list "
                         "goes into %s.", self.name, split, len(skipped.missing),
                         len(split_clips), len(missing_videos), base.REPORT_FILE)
    self._listing = (tuple(names), items)
    return self._listing

  def class_names(self) -> tuple[str, ...]:
    return self._list()[0]

  def split_items(self) -> dict[str, list[base.VideoItem]]:
    return self._list()[1]


def _find_optional(root: str, name: str, what: str) -> str | None:
  """`manual.find_file`, or None when the file is not there."""
  try:
    return manual.find_file(root, name, what)
  except ValueError:
    return None


def _read_csv_columns(path: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if not set(columns) <= set(reader.fieldnames or ()):
      raise ValueError(f"{path}: expected the columns {list(columns)}, got "
                       f"{reader.fieldnames}.")
    return [{c: (row[c] or "").strip() for c in columns} for row in reader]


class MsrVtt(CaptionedManual, skip_registration=True):
  """MSR-VTT (Xu et al. 2016): 10,000 videos, 20 sentences each, 20 categories."""

  name = "msrvtt"
  NUM_CATEGORIES = 20
  PROTOCOLS = ("1k-A", "official")
  OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}

  def __init__(self, *, data_dir: str, manual_dir: str, protocol: str = "", **kwargs):
    self.protocol = self.check_protocol(protocol)
    super().__init__(data_dir=data_dir, manual_dir=manual_dir, protocol=self.protocol,
                     **kwargs)

  @classmethod
  def check_protocol(cls, protocol: str) -> str:
    """`protocol`, '' meaning the default `1k-A`; a ValueError for an unknown one."""
    protocol = protocol or cls.PROTOCOLS[0]
    if protocol not in cls.PROTOCOLS:
      raise ValueError(f"msrvtt: unknown protocol {protocol!r} "
                       f"(config.data.split_protocol); the protocols are {cls.PROTOCOLS}.")
    return protocol

  @classmethod
  def config_name_for(cls, *, resize_short: int = 256, protocol: str = "", **unused) -> str:
    del unused
    return f"{cls.check_protocol(protocol)}_short{resize_short}"

  def _read_json(self) -> tuple[dict[str, tuple[int, str]], dict[str, list[str]], str]:
    """`({video_id: (category, json split)}, {video_id: [sentence]}, files read)`."""
    pair = [_find_optional(self.root, n, self.name)
            for n in ("train_val_videodatainfo.json", "test_videodatainfo.json")]
    if all(pair):
      paths = pair
    else:
      merged = _find_optional(self.root, "MSRVTT_data.json", self.name)
      if merged is None:
        raise ValueError(f"msrvtt: neither 'train_val_videodatainfo.json' + "
                         f"'test_videodatainfo.json' nor 'MSRVTT_data.json' found in "
                         f"{self.root!r} or its subfolders (docs/data.md gives the layout).")
      paths = [merged]
    videos, sentences = {}, collections.defaultdict(list)
    for path in paths:
      with open(path) as f:
        data = json.load(f)
      for v in data["videos"]:
        category = int(v["category"])
        if not 0 <= category < self.NUM_CATEGORIES:
          raise ValueError(f"{path}: video {v['video_id']} has category {category}, not "
                           f"in 0..{self.NUM_CATEGORIES - 1}.")
        videos[v["video_id"]] = (category, v["split"])
      for s in data["sentences"]:
        sentences[s["video_id"]].append(s["caption"].strip())
    return videos, sentences, " + ".join(paths)

  def annotations(self):
    names = tuple(f"category{i:02d}" for i in range(self.NUM_CATEGORIES))
    videos, sentences, source = self._read_json()

    def clip(video_id, captions):
      if not captions:
        raise ValueError(f"{source}: video {video_id} has no sentences.")
      return Clip(video_id, names[videos[video_id][0]], video_id, tuple(captions))

    clips = {}
    if self.protocol == "official":
      clips = {split: [] for split in self.OFFICIAL_SPLITS.values()}
      for video_id, (_, split) in videos.items():
        if split not in self.OFFICIAL_SPLITS:
          raise ValueError(f"{source}: video {video_id} has split {split!r}, not one of "
                           f"{sorted(self.OFFICIAL_SPLITS)}.")
        clips[self.OFFICIAL_SPLITS[split]].append(clip(video_id, sentences[video_id]))
      return names, clips
    train = _read_csv_columns(manual.find_file(self.root, "MSRVTT_train.9k.csv", self.name),
                              ("video_id",))
    test_path = manual.find_file(self.root, "MSRVTT_JSFUSION_test.csv", self.name)
    test = _read_csv_columns(test_path, ("video_id", "sentence"))
    for row in train + test:
      if row["video_id"] not in videos:
        raise ValueError(f"msrvtt: video {row['video_id']!r} of the 1k-A lists is not in "
                         f"{source}.")
    clips["train"] = [clip(r["video_id"], sentences[r["video_id"]]) for r in train]
    clips["test"] = [clip(r["video_id"], [r["sentence"]]) for r in test]
    return names, clips


class YouCook2(CaptionedManual, skip_registration=True):
  """YouCook2 (Zhou et al. 2018): cooking videos cut into captioned procedure segments."""

  name = "youcook2"
  ANNOTATIONS = "youcookii_annotations_trainval.json"
  SUBSETS = {"training": "train", "validation": "val"}

  def annotations(self):
    path = manual.find_file(self.root, self.ANNOTATIONS, self.name)
    with open(path) as f:
      database = json.load(f)["database"]
    names = video_folder.sort_labels(str(v["recipe_type"]) for v in database.values())
    clips = {split: [] for split in self.SUBSETS.values()}
    for youtube_id, video in database.items():
      if video["subset"] not in self.SUBSETS:
        raise ValueError(f"{path}: video {youtube_id} has subset {video['subset']!r}, not "
                         f"one of {sorted(self.SUBSETS)}.")
      for a in video["annotations"]:
        start, end = (float(t) for t in a["segment"])
        clips[self.SUBSETS[video["subset"]]].append(Clip(
            youtube_id, str(video["recipe_type"]), f"{youtube_id}_{a['id']}",
            (a["sentence"].strip(),), start, end))
    return names, clips
