"""Damaged prepared data: truncated shards and damaged records are named (file and
record) at preparation or reading; training videos whose frames do not decode are
replaced by the next video of the stream, the same way after a resume, up to
`config.data.max_bad_clips`."""

import logging
import os
import re
import shutil

import numpy as np
import pytest
from array_record.python import array_record_module

import synthetic_tsm
from conftest import set_keys
from gta_jax.data import builders
from gta_jax.data import pipeline
from gta_jax.data import preparation

BAD_VIDEOS = (3, 7, 8)  # positions in the train split; 7 and 8 are neighbours


def tiny_config(data_dir, **overrides):
  return set_keys(synthetic_tsm.get_config(), {
      "data.data_dir": str(data_dir), "data.synthetic.train_per_class": 2,
      "data.synthetic.val_per_class": 2, "data.num_frames": 4, "data.num_workers": 0,
      "batch_size": 4, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The tiny dataset's config and prepared folder."""
  config = tiny_config(tmp_path_factory.mktemp("data"))
  preparation.prepare(config.data)
  return config, builders.prepared_dir(config.data)


@pytest.fixture
def damaged_copy(prepared, tmp_path):
  """A copy of the prepared dataset and its val shard, to be damaged."""
  config, path = prepared
  copy = tiny_config(tmp_path / "data")
  target = builders.prepared_dir(copy.data)
  shutil.copytree(path, target)
  [shard] = [os.path.join(target, n) for n in os.listdir(target) if "-val.array_record" in n]
  return copy, shard


def test_truncated_shard_stops_preparation_naming_it(tmp_path, monkeypatch):
  builder_class = builders.builder_class("synthetic_motion")
  write_report = builder_class.write_report

  def write_report_then_truncate(self):  # a shard cut short as it is written
    report = write_report(self)
    [shard] = [os.path.join(self.prepared_dir, n) for n in os.listdir(self.prepared_dir)
               if "-train.array_record" in n]
    os.truncate(shard, os.path.getsize(shard) // 2)
    return report

  monkeypatch.setattr(builder_class, "write_report", write_report_then_truncate)
  with pytest.raises(pipeline.CorruptDataError,
                     match=r"shard .*-train\.array_record-00000-of-00001 (holds \d+ "
                           r"records, 'train' lists 20|cannot be opened).*: it is truncated"):
    preparation.prepare(tiny_config(tmp_path).data)


def test_truncated_shard_is_named_when_read(damaged_copy):
  config, shard = damaged_copy
  os.truncate(shard, os.path.getsize(shard) // 2)
  source = pipeline.open_source(config, "val")
  with pytest.raises(pipeline.CorruptDataError,
                     match=re.escape(f"cannot read record 5 of {shard} (element 5 ")):
    source[5]


def test_damaged_record_is_named_when_read(damaged_copy):
  """Bytes flipped in the middle of the shard: exactly the records that array_record
  itself cannot read are reported, each with the shard's name."""
  config, shard = damaged_copy
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:
    f.seek(size // 2)
    data = f.read(64)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  reader = array_record_module.ArrayRecordReader(shard)
  unreadable = set()
  for i in range(reader.num_records()):
    try:
      reader.read([i])
    except Exception:  # pylint: disable=broad-except
      unreadable.add(i)
  assert unreadable
  named = set()
  source = pipeline.open_source(config, "val")
  for i in range(len(source)):
    try:
      source[i]
    except pipeline.CorruptDataError as e:
      named.add(int(re.search(rf"cannot read record (\d+) of {re.escape(shard)}",
                              str(e)).group(1)))
  assert named == unreadable


class BadFrames:
  """A split whose videos `bad` have undecodable frames (damaged JPEG bytes)."""

  def __init__(self, source, bad):
    self.source, self.bad = source, set(bad)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    element = self.source[int(i)]
    if int(i) in self.bad:
      element = dict(element, frames=np.array([b"\xff\xd8damaged"] * len(
          element["frames"]), dtype=object))
    return element


def loader(config, bad=()):
  source = pipeline.open_source(config, config.data.train_split)
  return pipeline.make_train_loader(config, seed=0, process_index=0, process_count=1,
                                    with_index=True, source=BadFrames(source, bad))


def clips(iterator, num_batches):
  """The next `num_batches` batches' clips, one (video_index, video) per row."""
  out = []
  for _ in range(num_batches):
    batch = next(iterator)
    out += list(zip(batch["video_index"].tolist(), batch["video"]))
  return out


NUM_BATCHES = 12  # 48 clips: more than two epochs of the 20 training videos


def test_bad_clips_are_replaced_by_the_next_of_the_stream_and_resume_the_same(
    prepared, caplog):
  config, _ = prepared
  clean = clips(iter(loader(config)), NUM_BATCHES + 2)
  # The reference: position p takes the first clip at or after p of the clean
  # stream whose video is not bad.
  want = []
  for p in range(NUM_BATCHES * config.batch_size):
    q = p
    while clean[q][0] in BAD_VIDEOS:
      q += 1
    want.append(clean[q])
  replaced = sum(index in BAD_VIDEOS for index, _ in clean[:len(want)])
  assert replaced >= 3

  iterator = iter(loader(config, BAD_VIDEOS))
  with caplog.at_level(logging.WARNING):
    got = clips(iterator, NUM_BATCHES)
  assert [i for i, _ in got] == [i for i, _ in want]
  for (_, video), (_, expected) in zip(got, want):
    np.testing.assert_array_equal(video, expected)
  assert iterator.bad_clips == replaced
  names = pipeline.open_source(config, config.data.train_split)
  for v in BAD_VIDEOS:  # each replaced video is named in the log, with its error
    assert f"{names[v]['video_id'].decode()}: cannot read the JPEG header" in caplog.text
  # Resumed at batch 5 (in 2 input workers): the same replacements.
  config_workers = tiny_config(config.data.data_dir, **{"data.num_workers": 2})
  resumed = iter(loader(config_workers, BAD_VIDEOS))
  resumed.set_state({"next_batch": 5})
  try:
    again = clips(resumed, NUM_BATCHES - 5)
  finally:
    resumed.close()
  assert [i for i, _ in again] == [i for i, _ in got[5 * config.batch_size:]]
  for (_, video), (_, expected) in zip(again, got[5 * config.batch_size:]):
    np.testing.assert_array_equal(video, expected)


def test_more_bad_clips_than_allowed_stop_the_run(prepared):
  config, _ = prepared
  strict = tiny_config(config.data.data_dir, **{"data.max_bad_clips": 1})
  iterator = iter(loader(strict, BAD_VIDEOS))
  with pytest.raises(pipeline.CorruptDataError, match="config.data.max_bad_clips=1"):
    clips(iterator, NUM_BATCHES)
