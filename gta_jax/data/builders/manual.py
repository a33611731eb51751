"""Builders for the manual-download datasets, from their official file layouts.

Put the official files in one folder (`manual_dir`); each builder finds its annotation
files there (at the top or one level down) and its videos anywhere below, by file name.
docs/data.md gives each layout. A video that an annotation lists but that is not on disk
is counted and reported, never fatal (every Kinetics copy misses some); a split none of
whose videos is found is an error (`manual_dir` is probably wrong).

* `kinetics400`: `train.csv`, `validate.csv` (columns `label,youtube_id,time_start,
  time_end,split`), clips `<youtube_id>_<start:06d>_<end:06d>.mp4` (or `<youtube_id>.mp4`)
  in one folder or one per class. Splits `train`, `validation`. Classes: the sorted labels
  of `train.csv` (400).
* `something_something_v2`: `something-something-v2-labels.json`,
  `something-something-v2-{train,validation}.json`, videos `<id>.webm`. Splits `train`,
  `validation`; classes in the labels file's order (174).
* `ucf101`: `ucfTrainTestlist/{classInd,trainlist0K,testlist0K}.txt`, videos
  `UCF-101/<class>/v_*.avi`. Splits `train`, `test` of fold K = `config.data.fold`.
* `hmdb51`: `testTrainMulti_7030_splits/<class>_test_splitK.txt` (1 = train, 2 = test,
  0 = unused), videos `<class>/<video>.avi`. Splits `train`, `test` of fold K.
"""

from __future__ import annotations

import csv
import json
import os
import re

from gta_jax.data.builders import base


def find_file(root: str, name: str, what: str) -> str:
  """`root/name` or `root/*/name`; a clear error naming the expected file otherwise."""
  candidates = [os.path.join(root, name)]
  if os.path.isdir(root):
    candidates += [os.path.join(root, d, name) for d in sorted(os.listdir(root))]
  for path in candidates:
    if os.path.exists(path):
      return path
  raise ValueError(f"{what}: {name!r} not found in {root!r} or its subfolders "
                   "(docs/data.md gives the expected layout).")


def index_videos(root: str, key=lambda name: os.path.splitext(name)[0]) -> dict[str, str]:
  """`key(file name) -> path` for every video file under `root` (the first one wins)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for name in sorted(filenames):
      if name.lower().endswith(base.VIDEO_EXTENSIONS):
        out.setdefault(key(name), os.path.join(dirpath, name))
  return out


class ManualBuilder(base.VideoBuilder, skip_registration=True):
  """Lists `(video key, label name)` per split from annotations, then finds the files."""

  HAS_FOLDS = False  # official splits 1-3 (UCF101, HMDB51), chosen by `fold`

  def __init__(self, *, data_dir: str, manual_dir: str, fold: int = 1, **kwargs):
    self.root = os.path.expanduser(manual_dir) if manual_dir else ""
    self._listing = None
    if self.HAS_FOLDS and fold not in (1, 2, 3):
      raise ValueError(f"{self.name}: config.data.fold must be 1, 2 or 3, got {fold}.")
    self.fold = fold if self.HAS_FOLDS else None
    extra = {"fold": fold} if self.HAS_FOLDS else {}
    super().__init__(data_dir=data_dir, **extra, **kwargs)

  @classmethod
  def config_name_for(cls, *, resize_short: int = 256, fold: int | None = None,
                      **unused) -> str:
    del unused
    return (f"fold{fold}_" if fold is not None else "") + f"short{resize_short}"

  def check_root(self) -> None:
    if not self.root or not os.path.isdir(self.root):
      raise ValueError(f"{self.name}: the manual_dir {self.root!r} does not exist.")

  def annotations(self) -> tuple[tuple[str, ...], dict[str, list[tuple[str, str]]]]:
    """`(class names, {split: [(video key, class name)]})`."""
    raise NotImplementedError

  def video_key(self, file_name: str) -> str:
    return os.path.splitext(file_name)[0]

  def _list(self):
    if self._listing is not None:
      return self._listing
    self.check_root()
    names, rows = self.annotations()
    index = {n: i for i, n in enumerate(names)}
    files = index_videos(self.root, self.video_key)
    items = {}
    for split, split_rows in rows.items():
      skipped = self.skipped.setdefault(split, base.Skipped())
      items[split] = []
      for keys, label in split_rows:
        keys = (keys,) if isinstance(keys, str) else keys
        path = next((files[k] for k in keys if k in files), None)
        if label not in index:
          skipped.missing.append((keys[0], f"unknown class {label!r}"))
        elif path is None:
          skipped.missing.append((keys[0], "video not found"))
        else:
          items[split].append(base.VideoItem(path, index[label], keys[0]))
      if split_rows and not items[split]:
        raise ValueError(f"{self.name}: none of the {len(split_rows)} {split} videos was "
                         f"found under {self.root!r} ({len(files)} video files there).")
      if skipped.missing:
        base.log.warning("%s/%s: %d of %d listed videos are missing or unlabelled; the "
                         "list goes into %s.", self.name, split, len(skipped.missing),
                         len(split_rows), base.REPORT_FILE)
    self._listing = (tuple(names), items)
    return self._listing

  def class_names(self) -> tuple[str, ...]:
    return self._list()[0]

  def split_items(self) -> dict[str, list[base.VideoItem]]:
    return self._list()[1]


class Kinetics400(ManualBuilder, skip_registration=True):
  name = "kinetics400"
  CSVS = {"train": ("train.csv",), "validation": ("validate.csv", "val.csv")}

  def annotations(self):
    rows = {}
    for split, names in self.CSVS.items():
      path = None
      for n in names:
        try:
          path = find_file(self.root, n, self.name)
          break
        except ValueError:
          if n == names[-1]:
            raise
      rows[split] = self._read(path)
    names = tuple(sorted({label for _, label in rows["train"]}))
    return names, rows

  @staticmethod
  def _read(path):
    out = []
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      need = {"label", "youtube_id", "time_start", "time_end"}
      if not need <= set(reader.fieldnames or ()):
        raise ValueError(f"{path}: expected the columns {sorted(need)}, got "
                         f"{reader.fieldnames}.")
      for row in reader:
        yid, start, end = row["youtube_id"], int(float(row["time_start"])), int(
            float(row["time_end"]))
        out.append(((f"{yid}_{start:06d}_{end:06d}", yid), row["label"].strip()))
    return out


class SomethingSomethingV2(ManualBuilder, skip_registration=True):
  name = "something_something_v2"

  def annotations(self):
    labels_path = find_file(self.root, "something-something-v2-labels.json", self.name)
    with open(labels_path) as f:
      labels = json.load(f)  # template -> "index"
    names = [None] * len(labels)
    for template, i in labels.items():
      names[int(i)] = template
    if any(n is None for n in names):
      raise ValueError(f"{labels_path}: the class indices are not 0..{len(labels) - 1}.")
    rows = {}
    for split in ("train", "validation"):
      path = find_file(self.root, f"something-something-v2-{split}.json", self.name)
      with open(path) as f:
        entries = json.load(f)
      rows[split] = [(str(e["id"]), e["template"].replace("[", "").replace("]", ""))
                     for e in entries]
    return tuple(names), rows


class Ucf101(ManualBuilder, skip_registration=True):
  name = "ucf101"
  HAS_FOLDS = True

  def video_key(self, file_name: str) -> str:
    return os.path.splitext(file_name)[0].lower()

  def annotations(self):
    class_ind = find_file(self.root, os.path.join("ucfTrainTestlist", "classInd.txt"),
                          self.name)
    lists = os.path.dirname(class_ind)
    by_index = {}
    with open(class_ind) as f:
      for line in f:
        if line.strip():
          i, name = line.split()
          by_index[int(i)] = name
    names = tuple(by_index[i] for i in sorted(by_index))
    lower = {n.lower(): n for n in names}
    rows = {"train": [], "test": []}
    for split, file in (("train", f"trainlist0{self.fold}.txt"),
                        ("test", f"testlist0{self.fold}.txt")):
      with open(os.path.join(lists, file)) as f:
        for line in f:
          parts = line.split()
          if not parts:
            continue
          rel = parts[0].replace("\\", "/")
          key = os.path.splitext(os.path.basename(rel))[0].lower()
          if len(parts) > 1:  # trainlist: a 1-based class index
            label = by_index.get(int(parts[1]), f"#{parts[1]}")
          else:  # testlist: the class is the folder
            folder = rel.split("/")[0]
            label = lower.get(folder.lower(), folder)
          rows[split].append((key, label))
    return names, rows


class Hmdb51(ManualBuilder, skip_registration=True):
  name = "hmdb51"
  HAS_FOLDS = True

  def annotations(self):
    split_dir = os.path.dirname(find_file(
        self.root, "testTrainMulti_7030_splits", self.name) + os.sep)
    pattern = re.compile(rf"^(.+)_test_split{self.fold}\.txt$")
    files = {m.group(1): os.path.join(split_dir, n) for n in sorted(os.listdir(split_dir))
             if (m := pattern.match(n))}
    if not files:
      raise ValueError(f"hmdb51: no '<class>_test_split{self.fold}.txt' in {split_dir!r}.")
    names = tuple(sorted(files))
    rows = {"train": [], "test": []}
    for name, path in files.items():
      with open(path) as f:
        for line in f:
          parts = line.split()
          if len(parts) == 2 and parts[1] in ("1", "2"):
            rows["train" if parts[1] == "1" else "test"].append(
                (os.path.splitext(parts[0])[0], name))
    return names, rows
