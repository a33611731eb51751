"""`video_folder`: a user's own videos, in one of three layouts under `manual_dir`.

1. Class folders of videos: `root/{train,val,test}/<class>/<video>.{mp4,avi,webm,mkv,...}`
   (any container PyAV reads; the extensions looked for are `base.VIDEO_EXTENSIONS`).
2. Class folders of frame folders: `root/<split>/<class>/<video>/img_00001.jpg ...`
   (frames in file-name order; `.jpg`, `.jpeg` or `.png`). Layouts 1 and 2 may be mixed.
3. CSV lists: `root/<split>.csv`, rows `path,label` (an optional `path,label` header),
   `path` relative to `root` (or absolute) naming a video file or a frame folder.

Classes are `root/classes.txt` (one name a line, in label order) when it exists, else
the sorted class folder names of `train` (layouts 1-2) or the sorted labels of
`train.csv` (layout 3; numerically sorted when all labels are integers).

What bad input does (see docs/data.md):
* missing or empty root, no split found, an empty class folder, a `val`/`test` class
  folder or CSV label that is not a class: a ValueError naming it, before any decoding;
  these are mistakes in the layout, and preparing around them would mislabel or drop a
  class silently.
* a CSV row whose file does not exist, an undecodable or empty video, an unreadable
  frame: logged with its path, skipped, counted in the summary and `prepare_report.json`;
  one bad file must not stop a long preparation.
"""

from __future__ import annotations

import csv
import os
import re

from gta_jax.data.builders import base

SPLIT_NAMES = ("train", "val", "validation", "test")


def _is_visible(name: str) -> bool:
  return not name.startswith((".", "_"))


def read_class_file(path: str) -> tuple[str, ...]:
  with open(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if len(set(names)) != len(names):
    raise ValueError(f"{path} lists a class twice.")
  return names


def sort_labels(labels) -> tuple[str, ...]:
  labels = set(labels)
  if all(re.fullmatch(r"-?\d+", x) for x in labels):
    return tuple(sorted(labels, key=int))
  return tuple(sorted(labels))


def folder_config_name(dataset: str, manual_dir: str, folder_name: str,
                       resize_short: int) -> str:
  """`<folder_name, else manual_dir's basename>_short<resize_short>`: the config name of
  a user's folder, so that two folders (or two sizes) never share a prepared copy."""
  name = folder_name or (os.path.basename(os.path.normpath(os.path.expanduser(manual_dir)))
                         if manual_dir else "")
  if not name:
    raise ValueError(f"{dataset} needs config.data.manual_dir (the folder of videos) or, "
                     "to read a prepared copy, config.data.folder_name.")
  return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}_short{resize_short}"


def _videos_in(folder: str) -> list[str]:
  """Video files and frame folders directly inside a class folder."""
  out = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not _is_visible(name):
      continue
    if os.path.isdir(path) or name.lower().endswith(base.VIDEO_EXTENSIONS):
      out.append(path)
  return out


class VideoFolder(base.VideoBuilder, skip_registration=True):
  """Videos (or frame folders) from class folders or CSV lists."""

  name = "video_folder"

  def __init__(self, *, data_dir: str, manual_dir: str, folder_name: str = "", **kwargs):
    self.root = os.path.expanduser(manual_dir) if manual_dir else ""
    self._layout = None
    super().__init__(data_dir=data_dir, manual_dir=manual_dir, folder_name=folder_name,
                     **kwargs)

  @classmethod
  def config_name_for(cls, *, manual_dir: str = "", folder_name: str = "",
                      resize_short: int = 256, **unused) -> str:
    del unused
    return folder_config_name(cls.name, manual_dir, folder_name, resize_short)

  # Listing ----------------------------------------------------------------------------

  def _scan(self):
    if self._layout is not None:
      return self._layout
    root = self.root
    if not root or not os.path.isdir(root):
      raise ValueError(f"video_folder: the folder {root!r} (config.data.manual_dir) does not "
                       "exist.")
    entries = [n for n in os.listdir(root) if _is_visible(n)]
    if not entries:
      raise ValueError(f"video_folder: the folder {root!r} is empty.")
    classes_file = os.path.join(root, "classes.txt")
    fixed = read_class_file(classes_file) if os.path.exists(classes_file) else None
    csvs = {n[:-4]: os.path.join(root, n) for n in entries if n.endswith(".csv")}
    if csvs:
      self._layout = self._scan_csv(csvs, fixed)
    else:
      self._layout = self._scan_folders(fixed)
    return self._layout

  def _scan_folders(self, fixed):
    root = self.root
    splits = [s for s in SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
    if "train" not in splits:
      raise ValueError(
          f"video_folder: no 'train' folder or '<split>.csv' in {root!r}. Expected "
          "root/train/<class>/<video> (and root/val/...), or root/train.csv with rows "
          "'path,label'; docs/data.md describes the layouts.")
    class_dirs = {}
    for split in splits:
      d = os.path.join(root, split)
      class_dirs[split] = sorted(n for n in os.listdir(d)
                                 if _is_visible(n) and os.path.isdir(os.path.join(d, n)))
      if not class_dirs[split]:
        raise ValueError(f"video_folder: {d!r} has no class folders.")
    names = fixed or tuple(class_dirs["train"])
    index = {n: i for i, n in enumerate(names)}
    items = {}
    for split in splits:
      items[split] = []
      for cls in class_dirs[split]:
        folder = os.path.join(root, split, cls)
        if cls not in index:
          raise ValueError(f"video_folder: the class folder {folder!r} is not one of the "
                           f"{len(names)} classes ({'classes.txt' if fixed else 'train'}'s).")
        videos = _videos_in(folder)
        if not videos:
          raise ValueError(f"video_folder: the class folder {folder!r} has no videos "
                           f"(files ending {', '.join(base.VIDEO_EXTENSIONS)} or frame "
                           "folders).")
        items[split] += [base.VideoItem(v, index[cls], os.path.relpath(v, root))
                         for v in videos]
    return names, items

  def _scan_csv(self, csvs, fixed):
    if "train" not in csvs:
      raise ValueError(f"video_folder: {self.root!r} has CSV lists "
                       f"{sorted(csvs)} but no train.csv.")
    rows = {split: self._read_csv(path) for split, path in csvs.items()}
    names = fixed or sort_labels(label for _, label, _ in rows["train"])
    index = {n: i for i, n in enumerate(names)}
    items = {}
    for split, split_rows in rows.items():
      skipped = self.skipped.setdefault(split, base.Skipped())
      items[split] = []
      for path, label, where in split_rows:
        if label not in index and fixed and re.fullmatch(r"\d+", label) and int(label) < len(
            names):
          label = names[int(label)]  # an index into classes.txt
        full = path if os.path.isabs(path) else os.path.join(self.root, path)
        if label not in index:
          base.log.warning("Unknown label %r at %s: row skipped.", label, where)
          skipped.missing.append((where, f"unknown label {label!r}"))
        elif not os.path.exists(full):
          base.log.warning("Missing file %s (%s): row skipped.", full, where)
          skipped.missing.append((where, f"missing file {full}"))
        else:
          items[split].append(base.VideoItem(full, index[label], path))
      if split_rows and not items[split]:
        raise ValueError(f"video_folder: none of the {len(split_rows)} rows of "
                         f"{csvs[split]!r} names an existing file with a known label "
                         f"(paths are relative to {self.root!r}).")
    return names, items

  @staticmethod
  def _read_csv(path: str) -> list[tuple[str, str, str]]:
    out = []
    with open(path, newline="") as f:
      for line, row in enumerate(csv.reader(f), 1):
        row = [x.strip() for x in row]
        if not row or not any(row) or row[0].startswith("#"):
          continue
        if line == 1 and [x.lower() for x in row[:2]] == ["path", "label"]:
          continue
        if len(row) < 2 or not row[0] or not row[1]:
          raise ValueError(f"{path}:{line}: expected 'path,label', got {','.join(row)!r}.")
        out.append((row[0], row[1], f"{path}:{line}"))
    if not out:
      raise ValueError(f"video_folder: {path!r} lists no videos.")
    return out

  def class_names(self) -> tuple[str, ...]:
    return self._scan()[0]

  def split_items(self) -> dict[str, list[base.VideoItem]]:
    return self._scan()[1]

