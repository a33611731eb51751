"""The grain input pipeline over prepared (ArrayRecord) datasets.

Datasets are prepared by `preparation.prepare_dataset(config)` (or `python -m
gta_jax.data.prepare`); this module reads them:

* `read_meta(path)`: what a prepared dataset holds.
* `make_train_loader(...)`: an infinite, per-process sharded, checkpointable grain loader
  of `dict(video=uint8 (B, T, H, W, 3), label=int32 (B,))`.
* `make_eval_loader(...)`: a finite loader of `dict(video=uint8 (B, V, T, H, W, 3),
  label, mask, video_index)` that covers the split exactly once across processes.

`data_dir` may be a bucket (`gs://...`): the ArrayRecord files are read from there
directly.

Only the sampled frames of a video are JPEG-decoded. Frames stay uint8 (normalise with
`transforms.normalize`, on the device).

Damaged data: a record that cannot be read (a truncated or damaged shard) raises
`CorruptDataError` naming the shard file and the record. A training video whose frames
do not decode is replaced by the next video of the stream that does (a function of the
position alone, so a resumed run makes the same replacements); the main process logs
the replaced videos and counts them, and stops with `CorruptDataError` past
`config.data.max_bad_clips`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import signal

import grain
import numpy as np

from gta_jax import paths
from gta_jax.data import builders
from gta_jax.data import sampling
from gta_jax.data import transforms

log = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What a prepared dataset holds."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  num_examples: dict[str, int]
  path: str = ""  # the prepared copy: <data_dir>/<name>/<config>/<version>


def is_prepared(path: paths.PathLike) -> bool:
  return (paths.path(path) / INFO_FILE).exists()


def read_meta(path: paths.PathLike) -> DatasetMeta:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = tfds.builder_from_directory(os.fspath(paths.path(path))).info
  names = tuple(info.features["label"].names)
  return DatasetMeta(name=info.name, num_classes=len(names), class_names=names,
                     num_examples={k: int(v.num_examples) for k, v in info.splits.items()},
                     path=path)


# Reading -------------------------------------------------------------------------------


class CorruptDataError(RuntimeError):
  """Prepared data that cannot be read or decoded (the message names what)."""


class NamedRecordSource:
  """A prepared split (a tfds ArrayRecordDataSource) whose read errors name the
  shard file and the record in it."""

  def __init__(self, source, split: str):
    self.source = source
    instructions = source.dataset_info.splits[split].file_instructions
    self._shards = [(i.filename, i.skip) for i in instructions]
    self._starts = np.cumsum([0] + [i.take for i in instructions])

  def __len__(self) -> int:
    return len(self.source)

  def where(self, index: int) -> str:
    """`record R of SHARD_FILE` for element `index` of the split."""
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    filename, skip = self._shards[shard]
    return f"record {skip + index - int(self._starts[shard])} of {filename}"

  def __getitem__(self, index):
    try:
      return self.source[int(index)]
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptDataError(
          f"cannot read {self.where(int(index))} (element {int(index)} of the split): "
          f"{type(e).__name__}: {e}. The prepared dataset is damaged: delete its folder "
          "and prepare it again.") from e

  def __getitems__(self, indices):
    try:
      return self.source.__getitems__(indices)
    except Exception:  # pylint: disable=broad-except
      return [self[i] for i in indices]  # the first unreadable one raises, named


def open_source(config, split: str) -> NamedRecordSource:
  """The prepared split as a grain random-access source (`NamedRecordSource`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = builders.prepared_dir(config.data)
  if not is_prepared(path):
    raise ValueError(f"{config.data.dataset!r} is not prepared at {path}; call "
                     "preparation.prepare_dataset(config) first.")
  builder = tfds.builder_from_directory(os.fspath(paths.path(path)))
  if split not in builder.info.splits:
    raise ValueError(f"{config.data.dataset!r} has no split {split!r}; its splits are "
                     f"{sorted(builder.info.splits)}.")
  return NamedRecordSource(builder.as_data_source(split), split)


def _frame_indices(data_config, num_frames: int, *, train: bool, rng=None, view: int = 0,
                   num_views: int = 1) -> np.ndarray:
  if data_config.sampling == "segment":
    return sampling.segment_indices(num_frames, data_config.num_frames, train=train, rng=rng,
                                    view=view, num_views=num_views)
  if data_config.sampling == "dense":
    return sampling.clip_indices(num_frames, data_config.num_frames,
                                 data_config.frame_interval, train=train, rng=rng, view=view,
                                 num_views=num_views)
  raise ValueError(f"config.data.sampling must be 'segment' or 'dense', got "
                   f"{data_config.sampling!r}.")


DECODERS = ("cpu", "dali")


def check_decoder(data_config) -> str:
  """`data.decoder`, checked: 'cpu' (libjpeg-turbo here) or 'dali' (on the GPU)."""
  if data_config.decoder not in DECODERS:
    raise ValueError(f"config.data.decoder must be one of {DECODERS}, got "
                     f"{data_config.decoder!r}.")
  return data_config.decoder


class TrainTransform(grain.transforms.RandomMap):  # pylint: disable=abstract-method
  """A video -> one sampled, decoded, cropped (and maybe flipped) clip and its label.

  With `data.decoder='dali'` the clip is left undecoded: the sampled frames' JPEG bytes
  (`jpegs`, `(T,)` object), the crop box (`box`, int32 `(4,)`) and the flip (`flip`),
  from the same random draws, for `dali.TrainBatches` to decode on the GPU.

  A `caption_encoder` (retrieval: `gta_jax.retrieval.data.CaptionEncoder`) adds one of
  the video's captions, drawn at random, as its text fields (`tokens`, `token_mask`
  or `vectors`).
  """

  def __init__(self, data_config, with_index: bool = False, caption_encoder=None):
    self.data = _plain(data_config)
    self.with_index = with_index
    self.caption_encoder = caption_encoder

  def random_map(self, element, rng: np.random.Generator):
    d = self.data
    frames = element["frames"]
    idx = _frame_indices(d, len(frames), train=True, rng=rng)
    try:
      if d.decoder == "dali":
        box, flip = transforms.train_crop(*transforms.jpeg_size(frames[int(idx[0])]),
                                          d.crop_size, d.scales, d.flip, rng)
        out = {"jpegs": np.array([frames[int(i)] for i in idx], dtype=object),
               "box": np.int32(box), "flip": np.bool_(flip)}
      else:
        out = {"video": transforms.train_clip(frames, idx, d.crop_size, d.scales, d.flip,
                                              rng)}
    except ValueError as e:  # undecodable JPEG bytes
      return BadClip(_video_name(element), str(e))
    out["label"] = np.int32(element["label"])
    if self.with_index:
      out["video_index"] = np.int64(element["index"])
    if self.caption_encoder is not None:
      out.update(self.caption_encoder.sample(element["captions"], rng))
    return out


def _video_name(element) -> str:
  name = element.get("video_id", element.get("index", "?"))
  return name.decode() if isinstance(name, bytes) else str(name)


@dataclasses.dataclass(frozen=True)
class BadClip:
  """What `TrainTransform` makes of a video whose frames do not decode."""
  video: str
  error: str


class ReplaceBadClips(grain.MapDataset):
  """Clip `i` of the stream, or if it is a `BadClip`, the next clip after it that is
  not; each gets `bad_videos`, the replaced videos and their errors ('' if none,
  else one `video: error` line each).

  At most `max_bad` clips in a row are replaced; more raise `CorruptDataError`.
  """

  def __init__(self, parent: grain.MapDataset, max_bad: int):
    super().__init__(parent)
    self._max_bad = max_bad

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._replace(index, self._parent[index])

  def _getitems(self, indices):
    elements = self._parent._getitems(indices)  # pylint: disable=protected-access
    return [self._replace(i, e) for i, e in zip(indices, elements)]

  def _replace(self, index: int, element):
    bad = []
    while isinstance(element, BadClip):
      bad.append(f"{element.video}: " + " ".join(element.error.split()))
      if len(bad) > self._max_bad:
        raise CorruptDataError(
            f"{len(bad)} training videos in a row do not decode (config.data."
            f"max_bad_clips={self._max_bad}): " + "; ".join(bad))
      element = self._parent[index + len(bad)]
    return dict(element, bad_videos=np.str_("\n".join(bad)))


class EvalTransform(grain.transforms.Map):
  """A video -> its `V = num_clips * num_crops` views (clip-major), or a masked pad row."""

  def __init__(self, data_config, eval_config):
    self.data = _plain(data_config)
    self.num_clips, self.num_crops = int(eval_config.num_clips), int(eval_config.num_crops)

  def map(self, element):
    d = self.data
    t, s, v = d.num_frames, d.crop_size, self.num_clips * self.num_crops
    if element["index"] < 0:  # padding
      return {"video": np.zeros((v, t, s, s, 3), np.uint8), "label": np.int32(-1),
              "mask": np.False_, "video_index": np.int64(-1)}
    frames = element["frames"]
    idx = np.concatenate([
        _frame_indices(d, len(frames), train=False, view=c, num_views=self.num_clips)
        for c in range(self.num_clips)])
    try:
      scale = transforms.short_side_scale(*transforms.jpeg_size(frames[0]), d.test_scale)
      decoded = transforms.decode_frames(frames, idx, scale)
    except ValueError as e:
      raise CorruptDataError(f"cannot decode the frames of video "
                             f"{_video_name(element)}: {e}") from e
    clips = decoded.reshape((self.num_clips, t) + decoded.shape[1:])
    views = np.stack([transforms.eval_crops(c, s, d.test_scale, self.num_crops)
                      for c in clips])  # (clips, crops, T, S, S, 3)
    return {"video": views.reshape((v, t, s, s, 3)), "label": np.int32(element["label"]),
            "mask": np.True_, "video_index": np.int64(element["index"])}


class _Plain:
  """A picklable, attribute-access copy of a ConfigDict's plain values."""

  def __init__(self, values: dict):
    self.__dict__.update(values)


def _plain(config) -> _Plain:
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  values = {k: v for k, v in values.items() if not isinstance(v, dict)}
  if "scales" in values:
    values["scales"] = tuple(float(x) for x in values["scales"])
  return _Plain(values)


class PaddedEvalSource:
  """The eval split laid out as `process_count` equal, batch-aligned blocks.

  Block `p` holds videos `[p * per, min((p + 1) * per, n))` with `per = ceil(n / P)`, then
  padding (`index == -1`) up to `per_padded`, a multiple of the batch size. Sharding this
  source into `P` contiguous shards gives every process the same number of batches and
  every video to exactly one process.
  """

  def __init__(self, source, process_count: int, batch_size: int):
    self.source = source
    self.n = len(source)
    self.per = math.ceil(self.n / process_count)
    self.per_padded = max(1, math.ceil(self.per / batch_size)) * batch_size
    self.process_count = process_count

  def __len__(self) -> int:
    return self.per_padded * self.process_count

  def real_index(self, i: int) -> int:
    p, j = divmod(int(i), self.per_padded)
    k = p * self.per + j
    return k if j < self.per and k < self.n else -1

  def __getitem__(self, i):
    k = self.real_index(i)
    if k < 0:
      return {"index": -1}
    return dict(self.source[k], index=k)


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count or global_batch < process_count:
    raise ValueError(f"{what}={global_batch} must be a positive multiple of the process "
                     f"count {process_count}.")
  return global_batch // process_count


def host_cores() -> int:
  """The CPU cores this process may use (its affinity: a SLURM task's share)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def worker_count(data_config) -> int:
  """`data.num_workers`, with -1 meaning one per core of :func:`host_cores`."""
  workers = int(data_config.num_workers)
  return host_cores() if workers < 0 else workers


def read_thread_count(data_config) -> int:
  """`data.read_threads`, with -1 meaning the cores divided among the workers."""
  threads = int(data_config.read_threads)
  return max(1, host_cores() // max(1, worker_count(data_config))) if threads < 0 else threads


def _read_options(data_config) -> grain.ReadOptions:
  # Each element of the iter dataset is a whole batch: threads decode batches ahead
  # (cv2 releases the GIL), in each worker process if there are any.
  return grain.ReadOptions(num_threads=read_thread_count(data_config), prefetch_buffer_size=2)


def _to_iter(ds: grain.MapDataset, data_config) -> grain.IterDataset:
  """Batches -> an iter dataset, in `num_workers` processes when > 0.

  The dataset is batched before it is split among workers, so worker `w` of `W` makes
  batches `w, w + W, ...` and the stream is the same batches in the same order for any
  number of workers.
  """
  it = ds.to_iter_dataset(_read_options(data_config))
  workers = worker_count(data_config)
  if workers > 0:
    _prepare_workers(workers)
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, int(data_config.prefetch))),
                        worker_init_fn=_ignore_sigterm)
  return it


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """In a worker: SIGTERM is the main process's to handle (a preemption often signals
  the whole process group; the main process saves, then stops its workers)."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchIterator:
  """Batches `k, k+1, ...` of a random-access dataset of batches; the state is `k`.

  `get_state()` is JSON bytes (`{"next_batch": k}`), the form grain's orbax checkpoint
  handler stores for non-`DatasetIterator` iterators; `set_state` restarts the pipeline at
  batch `k` by slicing the dataset, so a state restores exactly whatever the number of
  workers before and after.
  """

  def __init__(self, batches: grain.MapDataset, data_config):
    self._batches = batches
    self._data_config = data_config
    self._next = 0
    self._it = None
    self.bad_clips = 0  # replaced clips this iterator has handed out

  def __iter__(self):
    return self

  def start_prefetch(self) -> None:
    if self._it is None:
      self._it = iter(_to_iter(self._batches[self._next:], self._data_config))

  def __next__(self):
    self.start_prefetch()
    batch = next(self._it)
    self._next += 1
    if "bad_videos" in batch:
      self._count_bad_clips(batch.pop("bad_videos"))
    return batch

  def _count_bad_clips(self, bad_videos: np.ndarray) -> None:
    """Logs the replaced clips of a batch; raises past `data.max_bad_clips`."""
    bad = [line for lines in bad_videos for line in str(lines).splitlines()]
    if not bad:
      return
    self.bad_clips += len(bad)
    limit = self._data_config.max_bad_clips
    log.warning("batch %d: replaced %d training clips that do not decode by the next "
                "of the stream (%d so far, config.data.max_bad_clips=%d): %s",
                self._next - 1, len(bad), self.bad_clips, limit, "; ".join(bad))
    if self.bad_clips > limit:
      raise CorruptDataError(
          f"{self.bad_clips} training clips did not decode, more than config.data."
          f"max_bad_clips={limit} (the last: {'; '.join(bad)}); the prepared dataset "
          "is damaged: prepare it again")

  def get_state(self) -> bytes:
    return json.dumps({"next_batch": self._next}).encode()

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    self.close()
    self._next = int(state["next_batch"])

  def close(self) -> None:
    """Stops the input workers and frees the batches they had read ahead."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None
    # Batches from worker processes live in shared memory, unlinked when the arrays
    # are deleted; grain's iterators hold them in reference cycles, which only the
    # collector frees (else: "leaked shared_memory objects" warnings at exit).
    gc.collect()


class TrainLoader:
  """An iterable of training batches; each `iter()` starts a `BatchIterator` at batch 0."""

  def __init__(self, batches: grain.MapDataset, data_config):
    self.batches = batches
    self.data_config = data_config

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self.batches, self.data_config)


def _prepare_workers(num_workers: int) -> None:
  """grain's worker processes read absl flags: mark them parsed outside absl.app."""
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()


class EvenSubset:
  """`n` videos of a source, spread evenly over it (a split may be sorted by class)."""

  def __init__(self, source, n: int):
    self.source = source
    self.indices = (np.arange(n) * len(source)) // n

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[int(i)])]


class IndexedSource:
  """A source whose records carry their own index (`"index"`)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    return dict(self.source[int(i)], index=int(i))


def make_train_loader(config, *, seed: int, process_index: int, process_count: int,
                      with_index: bool = False, mesh=None, caption_encoder=None,
                      source=None, transform=None):
  """An infinite iterable of training batches for this process.

  `iter(loader)` is a `BatchIterator` with `get_state()`/`set_state()` for an exact
  resume (grain's orbax checkpoint handler saves and restores it). All processes walk one
  global stream of the videos, shuffled by `(seed, epoch)` epoch after epoch, cut into
  global batches of `config.batch_size`; process `p` of `P` takes rows
  `[p * B_local, (p + 1) * B_local)` of each. Each clip's randomness (frames, crop, flip)
  comes from `seed` and its position in the global stream, and batches are made before the
  worker split, so the global batches are the same for any process count and any
  `config.data.num_workers`: a run's loss curve does not depend on how it is spread.

  Yields `dict(video=uint8 (B_local, T, S, S, 3), label=int32 (B_local,))`, with
  `B_local = config.batch_size // process_count`, remainders dropped; `with_index` adds
  `video_index=int64 (B_local,)`, the videos' positions in the split. With
  `config.data.decoder='dali'` (which needs the `mesh`), `video` is instead a global
  `jax.Array` decoded on this process's devices and sharded along the mesh's `data` axis
  (`gta_jax.data.dali`); everything else, the state included, is the same. A
  `caption_encoder` adds a random caption of each video (`TrainTransform`). A `source`
  and `transform` replace the prepared split and `TrainTransform` (retrieval's
  cached features of a frozen video network).
  """
  d = config.data
  if check_decoder(d) == "dali" and mesh is None:
    raise ValueError("config.data.decoder='dali' decodes on the mesh's devices: pass "
                     "make_train_loader(..., mesh=mesh).")
  batch = _local_batch(config.batch_size, process_count, "config.batch_size")
  source = open_source(config, d.train_split) if source is None else source
  if with_index:
    source = IndexedSource(source)
  if len(source) < config.batch_size:
    raise ValueError(f"The {d.train_split!r} split has {len(source)} videos, fewer than "
                     f"config.batch_size={config.batch_size}.")
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=int(seed)).repeat(None)  # each epoch reshuffled by seed + epoch
  transform = transform or TrainTransform(d, with_index, caption_encoder)
  ds = ds.random_map(transform, seed=int(seed))
  ds = ReplaceBadClips(ds, int(d.max_bad_clips))
  # Local batches in global order: global batch g is local batches g*P .. g*P + P-1.
  ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
  if d.decoder == "dali":
    from gta_jax.data import dali  # pylint: disable=g-import-not-at-top
    return dali.TrainLoader(TrainLoader(ds, d), d.crop_size, mesh)
  return TrainLoader(ds, d)


class EvalLoader:
  """A finite iterable of eval batches; `num_batches` is the same on every process."""

  def __init__(self, loader, num_batches: int, num_videos: int):
    self._loader = loader
    self.num_batches = num_batches
    self.num_videos = num_videos

  def __iter__(self):
    return iter(self._loader)


def make_eval_loader(config, split: str, *, process_index: int, process_count: int,
                     max_videos: int = 0):
  """A finite loader over `split` for this process (see the module docstring).

  `max_videos > 0` takes an evenly spread subset of that many videos (`video_index`
  then counts within the subset).

  Yields `dict(video=uint8 (B_local, V, T, S, S, 3), label=int32, mask=bool,
  video_index=int64)`, `V = eval.num_clips * eval.num_crops`, `S = data.crop_size` (after
  resizing the short side to `data.test_scale`). Across processes every video appears once
  with `mask=True`; padding rows have `mask=False`, `label=-1`, `video_index=-1` and a zero
  video; every process yields the same number of batches.
  """
  d = config.data
  batch = _local_batch(config.eval.batch_size, process_count, "config.eval.batch_size")
  source = open_source(config, split)
  if 0 < max_videos < len(source):
    source = EvenSubset(source, max_videos)
  padded = PaddedEvalSource(source, process_count, batch)
  ds = grain.MapDataset.source(padded)
  ds = ds[process_index * padded.per_padded:(process_index + 1) * padded.per_padded]
  ds = ds.map(EvalTransform(d, config.eval)).batch(batch, drop_remainder=True)
  return EvalLoader(_to_iter(ds, d), padded.per_padded // batch, padded.n)
