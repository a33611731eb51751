"""Preparing captioned datasets: captioned_folder CSVs, MSR-VTT and YouCook2 layouts.

Tiny fakes of each layout, written here; nothing is downloaded.
"""

import json
import os

import av
import numpy as np
import pytest

from gta_jax.data import builders
from gta_jax.data import preparation
from gta_jax.data import transforms
from test_data_builders import data_config
from test_data_builders import read_split
from test_data_builders import report_of
from test_data_builders import write_frames
from test_data_builders import write_video

FPS = 10


def write_ramp(path, seconds, size=(32, 32)):
  """A video at FPS frames/s whose frame t is filled with grey `ramp_grey(t)`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
    for t in range(int(seconds * FPS)):
      frame = np.full(size + (3,), ramp_grey(t), np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def ramp_grey(t):
  return 10 + 8 * t


def grey_of(jpeg):
  return float(np.median(transforms.decode_jpeg(jpeg)))


def prepare(d):
  """Prepares `d`; returns ({split: {video_id: example}}, the prepared folder)."""
  meta = preparation.prepare(d)
  out = {split: {e["video_id"].decode(): e for e in read_split(d, split)}
         for split in meta.num_examples}
  path = builders.prepared_dir(d)
  with open(os.path.join(path, "captions.json")) as f:
    captions = json.load(f)
  assert set(captions) == set(out)
  for split in out:  # captions.json follows the data source's order
    source = read_split(d, split)
    assert captions[split] == [[c.decode() for c in e["captions"]] for e in source]
  return meta, out


def captions_of(example):
  return [c.decode() for c in example["captions"]]


# captioned_folder --------------------------------------------------------------------


def test_captioned_folder(tmp_path):
  root = tmp_path / "my_clips"
  write_video(root / "clips" / "a.mp4", 30)
  write_video(root / "clips" / "b.mp4", 210)
  write_frames(str(root / "frames" / "c"), 150)
  write_ramp(root / "long.mp4", 3)
  (root / "train.csv").write_text(
      "path,caption,start,end\n"
      "clips/a.mp4,a dog runs,,\n"
      "clips/b.mp4,a cat sleeps,,\n"
      'clips/a.mp4,"a dog, running",,\n'  # a second caption of a.mp4
      "frames/c,a frame folder,,\n"
      "long.mp4,the first second,0,1\n"
      "long.mp4,the second second,1,2\n"
      "long.mp4,the second second again,1,2\n"
      "clips/gone.mp4,not on disk,,\n"  # line 9
      "clips/b.mp4,,,\n"  # 10: an empty caption
      "clips/b.mp4,bad time,abc,\n"  # 11
      "clips/b.mp4,backwards,2,1\n")  # 12
  (root / "val.csv").write_text("path,caption\nclips/b.mp4,the val caption\n")
  d = data_config(tmp_path, "captioned_folder", root)
  assert builders.prepared_dir(d).split(os.sep)[-2] == "my_clips_short16"
  meta, splits = prepare(d)
  assert meta.class_names == ("video",)
  assert meta.num_examples == {"train": 5, "val": 1}
  train = splits["train"]
  assert {k: captions_of(e) for k, e in train.items()} == {
      "clips/a.mp4": ["a dog runs", "a dog, running"],
      "clips/b.mp4": ["a cat sleeps"],
      "frames/c": ["a frame folder"],
      "long.mp4@0-1": ["the first second"],
      "long.mp4@1-2": ["the second second", "the second second again"]}
  assert abs(grey_of(train["clips/b.mp4"]["frames"][0]) - 210) < 12
  first, second = train["long.mp4@0-1"], train["long.mp4@1-2"]
  assert (first["start"], first["end"], train["clips/a.mp4"]["start"]) == (0, 1, -1)
  assert abs(second["num_frames"] - FPS) <= 1
  assert abs(grey_of(second["frames"][0]) - ramp_grey(FPS)) < 12
  assert captions_of(splits["val"]["clips/b.mp4"]) == ["the val caption"]
  report = report_of(d)
  assert report["train"]["missing"] == 4 and report["val"]["missing"] == 0
  where = {w.rsplit(":", 1)[1]: reason for w, reason in report["train"]["missing_items"]}
  assert all(w.startswith(str(root / "train.csv")) for w, _ in report["train"]["missing_items"])
  assert "gone.mp4" in where["9"] and where["10"] == "empty caption"
  assert "'abc'" in where["11"] and where["12"] == "start 2 >= end 1"


@pytest.mark.parametrize("files,message", [
    (None, "does not exist"),
    ({"val.csv": "path,caption\nx.mp4,a\n"}, "no train.csv in"),
    ({"train.csv": "x.mp4,a caption\n"}, r"train\.csv: expected a header 'path,caption'"),
    ({"train.csv": "path,caption\nnope.mp4,a\nx.mp4,\n"},
     r"none of the 2 rows of .*train\.csv"),
])
def test_captioned_folder_errors(tmp_path, files, message):
  root = tmp_path / "clips"
  if files is not None:
    write_video(root / "x.mp4", 100, num_frames=2)
    for name, text in files.items():
      (root / name).write_text(text)
  with pytest.raises(ValueError, match=message):
    preparation.prepare(data_config(tmp_path, "captioned_folder", root))


# MSR-VTT -----------------------------------------------------------------------------

# video_id -> (category, official split); video2 is not on disk.
MSRVTT_VIDEOS = {"video0": (0, "train"), "video1": (19, "train"), "video2": (3, "train"),
                 "video3": (5, "validate"), "video4": (0, "test"), "video5": (7, "test")}


def make_msrvtt(root, merged):
  """A fake MSR-VTT: six videos, two sentences each, both 1k-A lists."""
  for i, vid in enumerate(MSRVTT_VIDEOS):
    if vid != "video2":
      write_video(root / "TrainValVideo" / f"{vid}.mp4", 20 + 40 * i, num_frames=3)
  videos = [{"video_id": v, "category": c, "split": s, "url": "u", "id": i}
            for i, (v, (c, s)) in enumerate(MSRVTT_VIDEOS.items())]
  sentences = [{"sen_id": 2 * i + k, "video_id": v, "caption": f"{v} sentence {k}"}
               for i, v in enumerate(MSRVTT_VIDEOS) for k in range(2)]
  annotations = root / "annotation"
  annotations.mkdir(parents=True)
  if merged:
    (annotations / "MSRVTT_data.json").write_text(json.dumps(
        {"videos": videos, "sentences": sentences}))
  else:
    for name, keep in (("train_val_videodatainfo.json", ("train", "validate")),
                       ("test_videodatainfo.json", ("test",))):
      ids = {v["video_id"] for v in videos if v["split"] in keep}
      (annotations / name).write_text(json.dumps(
          {"videos": [v for v in videos if v["video_id"] in ids],
           "sentences": [s for s in sentences if s["video_id"] in ids]}))
  (annotations / "MSRVTT_train.9k.csv").write_text(
      "video_id\nvideo0\nvideo1\nvideo2\nvideo3\n")
  (annotations / "MSRVTT_JSFUSION_test.csv").write_text(
      "key,vid_key,video_id,sentence\nret0,msr4,video4,video4 sentence 1\n"
      "ret1,msr5,video5,video5 sentence 0\n")


def check_msrvtt_labels(meta, split):
  assert meta.class_names == tuple(f"category{i:02d}" for i in range(20))
  for vid, e in split.items():
    assert e["label"] == MSRVTT_VIDEOS[vid][0]
    assert abs(grey_of(e["frames"][0]) - (20 + 40 * int(vid[5:]))) < 12


def test_msrvtt_1k_a(tmp_path):
  root = tmp_path / "msrvtt"
  make_msrvtt(root, merged=True)
  d = data_config(tmp_path, "msrvtt", root)  # split_protocol '' = 1k-A
  assert builders.prepared_dir(d).split(os.sep)[-2] == "1k-A_short16"
  meta, splits = prepare(d)
  assert meta.num_examples == {"train": 3, "test": 2}
  assert {k: captions_of(e) for k, e in splits["train"].items()} == {
      v: [f"{v} sentence 0", f"{v} sentence 1"] for v in ("video0", "video1", "video3")}
  assert {k: captions_of(e) for k, e in splits["test"].items()} == {
      "video4": ["video4 sentence 1"], "video5": ["video5 sentence 0"]}
  for split in splits.values():
    check_msrvtt_labels(meta, split)
  report = report_of(d)
  assert report["train"]["missing_items"] == [["video2", "video video2 not found"]]
  assert report["test"]["missing"] == 0


def test_msrvtt_official(tmp_path):
  root = tmp_path / "msrvtt"
  make_msrvtt(root, merged=False)
  d = data_config(tmp_path, "msrvtt", root, split_protocol="official")
  assert builders.prepared_dir(d).split(os.sep)[-2] == "official_short16"
  meta, splits = prepare(d)
  assert meta.num_examples == {"train": 2, "val": 1, "test": 2}
  assert {split: sorted(s) for split, s in splits.items()} == {
      "train": ["video0", "video1"], "val": ["video3"], "test": ["video4", "video5"]}
  assert captions_of(splits["test"]["video5"]) == ["video5 sentence 0", "video5 sentence 1"]
  for split in splits.values():
    check_msrvtt_labels(meta, split)
  assert report_of(d)["train"]["missing"] == 1


def test_msrvtt_errors(tmp_path):
  root = tmp_path / "msrvtt"
  d = data_config(tmp_path, "msrvtt", root, split_protocol="7k")
  with pytest.raises(ValueError, match=r"unknown protocol '7k'.*'1k-A', 'official'"):
    preparation.prepare(d)
  d.split_protocol = "official"
  root.mkdir()
  with pytest.raises(ValueError, match="(?s)train_val_videodatainfo.json.*MSRVTT_data.json"):
    preparation.prepare(d)
  make_msrvtt(root, merged=True)
  for vid in ("video4", "video5"):
    os.remove(root / "TrainValVideo" / f"{vid}.mp4")
  with pytest.raises(ValueError, match="none of the 2 test videos was found"):
    preparation.prepare(d)


# YouCook2 ----------------------------------------------------------------------------


def test_youcook2(tmp_path):
  root = tmp_path / "youcook2"
  database = {
      "vidA": {"subset": "training", "recipe_type": "113", "duration": 3.0,
               "video_url": "u", "annotations": [
                   {"id": 0, "segment": [0, 1], "sentence": "crack the eggs"},
                   {"id": 1, "segment": [1, 2], "sentence": "whisk the eggs"}]},
      "vidB": {"subset": "validation", "recipe_type": "101", "duration": 3.0,
               "video_url": "u", "annotations": [
                   {"id": 0, "segment": [0.5, 2.5], "sentence": "slice the bread"}]},
      "vidC": {"subset": "training", "recipe_type": "101", "duration": 9.0,
               "video_url": "u", "annotations": [  # not on disk
                   {"id": 0, "segment": [1, 3], "sentence": "a"},
                   {"id": 1, "segment": [4, 6], "sentence": "b"}]},
  }
  (root / "annotations").mkdir(parents=True)
  (root / "annotations" / "youcookii_annotations_trainval.json").write_text(
      json.dumps({"database": database}))
  write_ramp(root / "raw_videos" / "training" / "113" / "vidA.mp4", 3)
  write_ramp(root / "raw_videos" / "validation" / "101" / "vidB.mkv", 3)
  d = data_config(tmp_path, "youcook2", root)
  meta, splits = prepare(d)
  assert meta.class_names == ("101", "113")
  assert meta.num_examples == {"train": 2, "val": 1}
  train, val = splits["train"], splits["val"]
  assert captions_of(train["vidA_1"]) == ["whisk the eggs"]
  assert captions_of(val["vidB_0"]) == ["slice the bread"]
  assert [train["vidA_0"]["label"], val["vidB_0"]["label"]] == [1, 0]
  for e, (start, end) in ((train["vidA_0"], (0, 1)), (train["vidA_1"], (1, 2)),
                          (val["vidB_0"], (0.5, 2.5))):
    assert (e["start"], e["end"]) == (start, end)
    assert abs(e["num_frames"] - (end - start) * FPS) <= 1  # only [start, end) decoded
    assert abs(grey_of(e["frames"][0]) - ramp_grey(start * FPS)) < 12
  report = report_of(d)
  assert report["train"]["missing_items"] == [["vidC_0", "video vidC not found"],
                                              ["vidC_1", "video vidC not found"]]
  assert report["val"]["missing"] == 0
