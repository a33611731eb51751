"""Preparing real files: video_folder layouts, the manual datasets' layouts, bad input, CLI.

Every test video is filled with its class's grey level, so a decoded frame tells which
class it came from: no video may come out with another class's label.
"""

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax.data import pipeline
from gta_jax.data import preparation
from gta_jax.data import transforms

GREYS = [30, 90, 150, 210]


def write_video(path, grey, num_frames=5, size=(24, 32)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  h, w = size
  # mpeg4 in every container (Matroska for .webm, which PyAV's webm muxer refuses).
  fmt = "matroska" if str(path).endswith(".webm") else None
  with av.open(str(path), "w", format=fmt) as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for t in range(num_frames):
      frame = np.full((h, w, 3), grey, np.uint8)
      frame[:2, :2 * (t + 1)] = 255 - grey  # frames differ a little
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_frames(folder, grey, num_frames=4, size=(24, 32)):
  os.makedirs(folder, exist_ok=True)
  for t in range(num_frames):
    with open(os.path.join(folder, f"img_{t + 1:05d}.jpg"), "wb") as f:
      f.write(transforms.encode_jpeg(np.full(size + (3,), grey, np.uint8)))


def data_config(tmp_path, dataset, manual_dir, **kw):
  d = config_lib.base_config().data
  d.dataset, d.manual_dir = dataset, str(manual_dir)
  d.data_dir = str(tmp_path / "prepared")
  d.resize_short = 16
  d.prepare_workers = 1
  for k, v in kw.items():
    d[k] = v
  return d


def read_split(d, split):
  c = config_lib.base_config()
  c.data = d
  source = pipeline.open_source(c, split)
  return [source[i] for i in range(len(source))]


def check_labels(examples, class_names, grey_of_class):
  """Every example's frames have its class's grey level; returns {video_id: class}."""
  out = {}
  for e in examples:
    assert e["num_frames"] == len(e["frames"]) > 0
    frame = transforms.decode_jpeg(e["frames"][-1])
    assert min(frame.shape[:2]) == 16  # short side resized at preparation
    grey = float(np.median(frame))
    name = class_names[e["label"]]
    assert abs(grey - grey_of_class[name]) < 12, (e["video_id"], name, grey)
    out[e["video_id"].decode()] = name
  return out


def prepare_and_check(d, class_names, num_examples, greys):
  """Prepares, checks the classes and split sizes, and every example's label."""
  meta = preparation.prepare(d)
  assert meta.class_names == class_names and meta.num_examples == num_examples
  return {split: check_labels(read_split(d, split), class_names, greys)
          for split in num_examples}


def report_of(d):
  from gta_jax.data import builders
  with open(os.path.join(builders.prepared_dir(d), "prepare_report.json")) as f:
    return json.load(f)


# video_folder ------------------------------------------------------------------------


def make_folder_dataset(root):
  classes = {"jump": GREYS[0], "run": GREYS[1], "swim": GREYS[2]}
  for cls, grey in classes.items():
    for i in range(2):
      write_video(root / "train" / cls / f"{cls}{i}.mp4", grey)
    write_video(root / "val" / cls / f"{cls}_v.avi", grey)
  write_frames(str(root / "train" / "run" / "frames_vid"), classes["run"])
  with open(root / "train" / "run" / "frames_vid" / "img_00009.jpg", "wb") as f:
    f.write(b"not a jpeg")  # an unreadable frame: skipped, the video kept
  with open(root / "val" / "swim" / "broken.mp4", "wb") as f:
    f.write(b"\x00\x01garbage" * 50)  # an undecodable video: skipped and named
  (root / "val" / "jump" / "empty.mp4").write_bytes(b"")  # an empty file
  (root / "train" / "jump" / "notes.txt").write_text("ignored")
  return classes


def test_video_folder_with_broken_files(tmp_path):
  root = tmp_path / "my_videos"
  greys = make_folder_dataset(root)
  d = data_config(tmp_path, "video_folder", root, prepare_workers=2)
  meta = preparation.prepare(d)
  assert meta.class_names == ("jump", "run", "swim")
  assert meta.num_examples == {"train": 7, "val": 3}
  train = check_labels(read_split(d, "train"), meta.class_names, greys)
  assert train["train/run/frames_vid"] == "run"
  check_labels(read_split(d, "val"), meta.class_names, greys)
  report = report_of(d)
  broken = {os.path.basename(p) for p, _ in report["val"]["broken_items"]}
  assert broken == {"broken.mp4", "empty.mp4"} and report["val"]["broken"] == 2
  assert report["train"]["bad_frames"] == 1
  assert report["train"]["bad_frame_items"][0][0].endswith("img_00009.jpg")
  # Prepared: a second call is a no-op even without the source folder.
  os.rename(root, tmp_path / "moved")
  assert preparation.prepare(d) == meta


@pytest.mark.parametrize("mutate,message", [
    (lambda r: os.makedirs(r / "train" / "dance"), "dance.*has no videos"),
    (lambda r: write_video(r / "val" / "fly" / "x.mp4", 0), "fly.*not one of the 3 classes"),
    (lambda r: os.rename(r / "train", r / "training"), "no 'train' folder"),
])
def test_video_folder_layout_errors(tmp_path, mutate, message):
  root = tmp_path / "vids"
  for cls in ("a", "b", "c"):
    write_video(root / "train" / cls / "x.mp4", 100, num_frames=2)
  mutate(root)
  with pytest.raises(ValueError, match=message):
    preparation.prepare(data_config(tmp_path, "video_folder", root))


def test_video_folder_missing_or_empty_root(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    preparation.prepare(data_config(tmp_path, "video_folder", tmp_path / "nope"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="is empty"):
    preparation.prepare(data_config(tmp_path, "video_folder", tmp_path / "empty"))


def test_video_folder_csv(tmp_path):
  root = tmp_path / "csvdata"
  greys = {"cat": GREYS[0], "dog": GREYS[3]}
  write_video(root / "clips" / "1.mp4", greys["cat"])
  write_video(root / "clips" / "2.mp4", greys["dog"])
  write_video(root / "clips" / "3.mp4", greys["dog"])
  write_frames(str(root / "clips" / "4"), greys["cat"])
  (root / "train.csv").write_text("path,label\nclips/1.mp4,cat\nclips/2.mp4,dog\n"
                                  "clips/4,cat\nclips/gone.mp4,dog\n")
  (root / "val.csv").write_text("clips/3.mp4,dog\nclips/1.mp4,bird\n")
  d = data_config(tmp_path, "video_folder", root)
  prepare_and_check(d, ("cat", "dog"), {"train": 3, "val": 1}, greys)
  report = report_of(d)
  assert report["train"]["missing"] == 1 and "gone.mp4" in report["train"]["missing_items"][0][1]
  assert report["val"]["missing"] == 1 and "bird" in report["val"]["missing_items"][0][1]


# Manual-download layouts -------------------------------------------------------------


def test_kinetics400_layout(tmp_path):
  root = tmp_path / "k400"
  greys = {"abseiling": GREYS[0], "air drumming": GREYS[2]}
  rows = {"train": [("abseiling", "aaa", 10, 20), ("air drumming", "bbb", 0, 10),
                    ("air drumming", "ccc", 5, 15)],
          "validate": [("abseiling", "ddd", 1, 11), ("air drumming", "eee", 2, 12)]}
  for split, split_rows in rows.items():
    lines = ["label,youtube_id,time_start,time_end,split"]
    for label, yid, start, end in split_rows:
      lines.append(f'"{label}",{yid},{start},{end},{split}')
      if yid != "ccc":  # one clip missing, as in every copy
        folder = root / split / label.replace(" ", "_")
        write_video(folder / f"{yid}_{start:06d}_{end:06d}.mp4", greys[label], num_frames=3)
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
  d = data_config(tmp_path, "kinetics400", root)
  prepare_and_check(d, ("abseiling", "air drumming"), {"train": 2, "validation": 2}, greys)
  assert report_of(d)["train"]["missing_items"] == [["ccc_000005_000015", "video not found"]]


def test_something_something_v2_layout(tmp_path):
  root = tmp_path / "ssv2"
  labels = {"Pushing something from left to right": "1",
            "Pushing something from right to left": "0"}
  greys = {t: g for t, g in zip(labels, GREYS[1:])}
  (root / "labels").mkdir(parents=True)
  (root / "labels" / "something-something-v2-labels.json").write_text(json.dumps(labels))
  entries = {"train": [("11", "Pushing [something] from left to right"),
                       ("12", "Pushing [something] from right to left")],
             "validation": [("13", "Pushing [something] from right to left")]}
  for split, split_entries in entries.items():
    (root / "labels" / f"something-something-v2-{split}.json").write_text(json.dumps(
        [{"id": i, "label": "x", "template": t, "placeholders": ["x"]}
         for i, t in split_entries]))
    for i, t in split_entries:
      write_video(root / "videos" / f"{i}.webm", greys[t.replace("[", "").replace("]", "")],
                  num_frames=3)
  d = data_config(tmp_path, "something_something_v2", root)
  prepare_and_check(d, ("Pushing something from right to left",
                        "Pushing something from left to right"),
                    {"train": 2, "validation": 1}, greys)


def test_ucf101_layout(tmp_path):
  root = tmp_path / "ucf"
  greys = {"ApplyEyeMakeup": GREYS[0], "HandstandPushups": GREYS[3]}
  lists = root / "ucfTrainTestlist"
  lists.mkdir(parents=True)
  (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
  (lists / "trainlist02.txt").write_text(
      "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
      "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\n")
  (lists / "testlist02.txt").write_text("HandstandPushups/v_HandStandPushups_g01_c01.avi\n")
  for cls, name in (("ApplyEyeMakeup", "v_ApplyEyeMakeup_g08_c01"),
                    ("HandstandPushups", "v_HandStandPushups_g08_c01"),
                    ("HandstandPushups", "v_HandStandPushups_g01_c01")):
    write_video(root / "UCF-101" / cls / f"{name}.avi", greys[cls], num_frames=3)
  d = data_config(tmp_path, "ucf101", root, fold=2)
  prepare_and_check(d, ("ApplyEyeMakeup", "HandstandPushups"), {"train": 2, "test": 1}, greys)
  d.fold = 4
  with pytest.raises(ValueError, match="fold must be 1, 2 or 3, got 4"):
    preparation.prepare(d)


def test_hmdb51_layout(tmp_path):
  root = tmp_path / "hmdb"
  greys = {"brush_hair": GREYS[1], "cartwheel": GREYS[2]}
  splits = root / "testTrainMulti_7030_splits"
  splits.mkdir(parents=True)
  (splits / "brush_hair_test_split1.txt").write_text("a1.avi 1 \nb1.avi 2 \nc1.avi 0 \n")
  (splits / "cartwheel_test_split1.txt").write_text("a2.avi 1 \nb2.avi 2 \n")
  (splits / "cartwheel_test_split2.txt").write_text("a2.avi 2 \nb2.avi 1 \n")
  for cls, names in (("brush_hair", ("a1", "b1", "c1")), ("cartwheel", ("a2", "b2"))):
    for n in names:
      write_video(root / cls / f"{n}.avi", greys[cls], num_frames=3)
  d = data_config(tmp_path, "hmdb51", root)
  ids = prepare_and_check(d, ("brush_hair", "cartwheel"), {"train": 2, "test": 2}, greys)
  assert set(ids["train"]) == {"a1", "a2"} and set(ids["test"]) == {"b1", "b2"}


def test_manual_dataset_without_manual_dir(tmp_path):
  c = config_lib.base_config()
  c.data.dataset, c.data.data_dir = "kinetics400", str(tmp_path)
  with pytest.raises(ValueError, match="(?s)manual_dir.*python -m gta_jax.data.prepare"):
    preparation.prepare_dataset(c)


def test_prepare_cli(tmp_path):
  root = tmp_path / "cli_videos"
  for cls, grey in (("a", 50), ("b", 200)):
    write_video(root / "train" / cls / "x.mp4", grey, num_frames=3)
  cmd = [sys.executable, "-m", "gta_jax.data.prepare", "--dataset=video_folder",
         f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}", "--resize_short=16",
         "--workers=1"]
  first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr
  assert "video_folder: prepared" in first.stdout and "2 classes" in first.stdout
  # The same preparation from a config is found prepared: a no-op.
  d = data_config(tmp_path, "video_folder", root, data_dir=str(tmp_path / "out"))
  from gta_jax.data import builders
  assert pipeline.is_prepared(builders.prepared_dir(d))
  assert preparation.prepare(d).num_examples == {"train": 2}
