"""What every video builder shares: the features, the on-disk location, and the parallel
decode-resize-encode loop with its bad-input accounting.

A prepared dataset lives in `<data_dir>/<name>/<config>/<version>/` (tfds' layout), as
uncompressed ArrayRecord shards plus `dataset_info.json`; it is read back with
`tfds.builder_from_directory(...).as_data_source(split)`, which needs neither TensorFlow
nor this module. Each example is one video:

  frames      the frames as JPEG bytes, `Tensor(shape=(None,), dtype=object)`
  num_frames  `int32`, `len(frames)`
  label       `ClassLabel` over the builder's class names
  video_id    `Text`, the video's id in its source (file path relative to the root, or id)

A captioned dataset (`CAPTIONED = True`, for text-video retrieval) adds:

  captions    the video's captions, UTF-8 bytes, `Tensor(shape=(None,), dtype=object)`
  start, end  `float32`, the clip's segment in its source video in seconds (-1: whole)

and writes `captions.json` beside the shards: `{split: [[caption, ...] per example in
the data source's order]}`, so that the text side (vocabulary, eval queries) never
has to read the frames.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import multiprocessing
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from gta_jax.data import video_io

REPORT_FILE = "prepare_report.json"
VIDEO_EXTENSIONS = video_io.VIDEO_EXTENSIONS

log = logging.getLogger(__name__)


VideoItem = video_io.VideoItem


@dataclasses.dataclass
class Skipped:
  """Videos (or frames) left out of a split, with the reason, for the summary."""
  missing: list = dataclasses.field(default_factory=list)  # (video_id or path, reason)
  broken: list = dataclasses.field(default_factory=list)  # (path, reason)
  bad_frames: list = dataclasses.field(default_factory=list)  # (path, reason)


CAPTIONS_FILE = "captions.json"


def features(class_names: Sequence[str], captioned: bool = False
             ) -> tfds.features.FeaturesDict:
  spec = {
      "frames": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "num_frames": tfds.features.Scalar(dtype=np.int32),
      "label": tfds.features.ClassLabel(names=list(class_names)),
      "video_id": tfds.features.Text(),
  }
  if captioned:
    spec.update(captions=tfds.features.Tensor(shape=(None,), dtype=np.object_),
                start=tfds.features.Scalar(dtype=np.float32),
                end=tfds.features.Scalar(dtype=np.float32))
  return tfds.features.FeaturesDict(spec)


def caption_fields(item: VideoItem) -> dict:
  """The captioned features of an item's example (see the module docstring)."""
  if not item.captions:
    raise ValueError(f"{item.video_id}: a captioned dataset's video needs a caption")
  return {"captions": np.array([c.encode("utf-8") for c in item.captions], dtype=object),
          "start": np.float32(item.start), "end": np.float32(item.end)}


def write_captions(prepared: str) -> dict[str, list[list[str]]]:
  """Writes `captions.json` of the prepared dataset at `prepared` (a local folder)."""
  source_builder = tfds.builder_from_directory(prepared)
  out = {}
  for split in source_builder.info.splits:
    source = source_builder.as_data_source(split)
    out[split] = [[c.decode("utf-8") if isinstance(c, bytes) else str(c)
                   for c in source[i]["captions"]] for i in range(len(source))]
  with open(os.path.join(prepared, CAPTIONS_FILE), "w") as f:
    json.dump(out, f)
  return out


class VideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder of videos stored as JPEG frames in ArrayRecord.

  Subclasses set `name`, implement `config_name_for()`, `class_names()` and
  `split_items() -> {split: [VideoItem]}` (or override `_generate_examples` entirely, as
  the synthetic dataset does). Missing files found while listing go to `self.skipped`.
  """

  VERSION = tfds.core.Version("1.0.0")  # a subclass bumps its own when its output changes
  CAPTIONED = False  # True: examples carry captions (base.caption_fields)
  # No checksums or metadata files next to the code; tfds' lookup of them would need
  # `importlib_resources` for an editable install.
  code_path = None

  def __init__(self, *, data_dir: str, resize_short: int = 256, jpeg_quality: int = 90,
               num_workers: int = 0, **params):
    """`params` are the subclass's own (see `config_name_for`)."""
    self.resize_short = int(resize_short)
    self.jpeg_quality = int(jpeg_quality)
    self.num_workers = int(num_workers) or (os.cpu_count() or 1)
    self.params = dict(params, resize_short=self.resize_short)
    self.skipped: dict[str, Skipped] = {}
    self.root_dir = os.path.expanduser(data_dir)
    super().__init__(data_dir=self.root_dir, file_format="array_record",
                     config=tfds.core.BuilderConfig(name=self.config_name()))

  # To implement ------------------------------------------------------------------------

  @classmethod
  def config_name_for(cls, **params) -> str:
    """The folder name of a preparation with these parameters, under `<data_dir>/<name>/`.

    A classmethod, so that a prepared copy is found without constructing the builder
    (tfds' constructor lists the classes, which needs the source files).
    """
    raise NotImplementedError

  def config_name(self) -> str:
    return self.config_name_for(**self.params)

  def class_names(self) -> tuple[str, ...]:
    raise NotImplementedError

  def split_items(self) -> dict[str, list[VideoItem]]:
    raise NotImplementedError

  # tfds -----------------------------------------------------------------------------

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self,
                                 features=features(self.class_names(), self.CAPTIONED))

  def _download_and_prepare(self, dl_manager, download_config):
    """tfds' preparation, then every shard rewritten without compression.

    Runs while tfds writes into its temporary folder, so a reader never sees a shard
    being rewritten.
    """
    super()._download_and_prepare(dl_manager, download_config)
    for shard in sorted(self.data_path.glob("*.array_record-*")):
      store_uncompressed(os.fspath(shard))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, items)
            for split, items in self.split_items().items()}

  def _generate_examples(self, split: str, items: Sequence[VideoItem]) -> Iterator:
    """Decodes the videos in worker processes; logs, skips and counts the broken ones."""
    skipped = self.skipped.setdefault(split, Skipped())
    load = functools.partial(video_io.load_video, resize_short=self.resize_short,
                             jpeg_quality=self.jpeg_quality)
    workers = min(self.num_workers, max(1, len(items)))
    results = _parallel_map(load, items, workers)
    for i, (item, (frames, bad_frames, error)) in enumerate(
        tfds.core.utils.tqdm(zip(items, results), total=len(items),
                             desc=f"Decoding {self.name} {split} videos", unit=" videos")):
      for path, reason in bad_frames:
        log.warning("Unreadable frame skipped: %s (%s)", path, reason)
        skipped.bad_frames.append((path, reason))
      if error is not None:
        log.warning("Video skipped: %s (%s)", item.path, error)
        skipped.broken.append((item.path, error))
        continue
      example = {"frames": np.array(frames, dtype=object), "num_frames": len(frames),
                 "label": item.label, "video_id": item.video_id}
      if self.CAPTIONED:
        example.update(caption_fields(item))
      yield i, example

  # Helpers -----------------------------------------------------------------------------

  @property
  def prepared_dir(self) -> str:
    return prepared_dir(self.root_dir, self.name, self.config_name(), str(self.VERSION))

  def write_report(self) -> dict:
    """Writes and returns the summary of what was left out, per split (and the
    captions file of a captioned dataset)."""
    if self.CAPTIONED:
      write_captions(self.prepared_dir)
    report = {split: {"missing": len(s.missing), "broken": len(s.broken),
                      "bad_frames": len(s.bad_frames),
                      "missing_items": s.missing, "broken_items": s.broken,
                      "bad_frame_items": s.bad_frames}
              for split, s in self.skipped.items()}
    with open(os.path.join(self.prepared_dir, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=1)
    for split, s in self.skipped.items():
      if s.missing or s.broken or s.bad_frames:
        log.warning("%s/%s: skipped %d missing and %d broken videos, %d unreadable frames; "
                    "the list is in %s", self.name, split, len(s.missing), len(s.broken),
                    len(s.bad_frames), os.path.join(self.prepared_dir, REPORT_FILE))
    return report


def prepared_dir(data_dir: str, name: str, config_name: str, version: str) -> str:
  return os.path.join(os.path.expanduser(data_dir), name, config_name, version)


def store_uncompressed(path: str, chunk: int = 64) -> None:
  """Rewrites a local ArrayRecord file with one record per chunk and no compression.

  tfds writes array_record's default, zstd, which saves nothing on JPEG frames (0-4%)
  but costs about 2.4 ms of CPU to read back a video of 48 frames of 13 KB, against 0.35 ms
  uncompressed: as much as decoding half of a clip's frames (benchmarks/README.md).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  if "uncompressed" in reader.writer_options_string().split(","):
    reader.close()
    return
  writer = array_record_module.ArrayRecordWriter(path + ".uncompressed",
                                                 "group_size:1,uncompressed")
  n = reader.num_records()
  for start in range(0, n, chunk):
    for record in reader.read(start, min(n, start + chunk)):
      writer.write(record)
  writer.close()
  reader.close()
  os.replace(path + ".uncompressed", path)


def _parallel_map(fn, items: Sequence, workers: int) -> Iterator:
  """`map(fn, items)` in order, in `workers` spawned processes (in-process when 1)."""
  if workers <= 1:
    yield from map(fn, items)
    return
  # 'spawn': the caller may be a process with jax (threads) already running.
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(fn, items, chunksize=1)
