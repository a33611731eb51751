"""Prepares datasets into ArrayRecord, once, for `pipeline` to read.

* `prepare(data_config)`: prepares `data_config.dataset` if it is not (a no-op when
  it is) and returns its `pipeline.DatasetMeta`.
* `prepare_dataset(config)`: the same, race-free across processes (one prepares, the
  others wait for it), checked against `config.model.num_classes`.

A dataset is prepared by one process at a time, elected by a lock beside its
folder, `<version>.lock`: locally a lock file (`_run_once`), in a bucket `data_dir`
(`gs://...`) a lease object (`_run_once_leased`, `training/lease.py`'s machinery).
One prepared for a bucket is written to a local staging folder first, then copied up
with `dataset_info.json` last, so that a half-copied dataset is never seen as
prepared. Each shard is checked to hold the records the dataset lists (a truncated
shard stops preparation, named, and the dataset is removed), and each copied file to
have its size.
`python -m gta_jax.data.prepare` is the command line.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time

from gta_jax import paths
from gta_jax import processes
from gta_jax.data import builders
from gta_jax.data import pipeline
from gta_jax.data.pipeline import DatasetMeta
from gta_jax.training import lease as lease_lib

log = logging.getLogger(__name__)

# A bucket's preparation lock (`_run_once_leased`): a preparer whose heartbeat (every
# tenth of this) is older is taken for dead; waiters look every _BUCKET_POLL_S.
_BUCKET_LOCK_TIMEOUT_S = 300.0
_BUCKET_POLL_S = 5.0


def _how_to_prepare(d) -> str:
  return (f"Dataset {d.dataset!r} is not prepared under {d.data_dir!r} and "
          "config.data.manual_dir is not set. Put its official files in a folder (docs/data.md "
          "gives each layout), then either set --config.data.manual_dir=DIR, or run\n"
          f"  python -m gta_jax.data.prepare --dataset={d.dataset} --manual_dir=DIR "
          f"--data_dir={d.data_dir}")


def _lock_text() -> str:
  """What a lock file holds: `host pid start` (start: `processes.start_time`, '-' if
  unknown), so that a later process that reuses the pid (PID 1 of a restarted
  container) is not taken for the holder."""
  return f"{socket.gethostname()} {os.getpid()} {processes.start_time(os.getpid()) or '-'}"


def _held_by_dead_process(lock: str) -> bool:
  """Whether `lock` names a process of this host that no longer runs."""
  try:
    with open(lock) as f:
      host, pid, *start = f.read().split()
    pid = int(pid)
  except (OSError, ValueError):
    return False  # the lock is being written or was just removed
  if not start and pid == os.getpid():  # this process writes start times: an older one
    return host == socket.gethostname()
  return processes.ended(host, pid, start[0].strip("-") if start else "")


def _remove_stale_lock(lock: str) -> bool:
  """Removes `lock` if its process is dead; returns whether it did. Checks again under
  a second lock so that two processes that both saw it stale cannot remove a new
  preparer's lock; that one is held a moment: one older than a minute was left by a
  killed process."""
  breaker = lock + ".break"
  if not processes.take_lock_file(breaker, stale_s=60):
    return False  # another process is removing it
  try:
    if not _held_by_dead_process(lock):
      return False
    log.warning("Removing the stale lock %s of a dead process.", lock)
    os.remove(lock)
    return True
  finally:
    os.remove(breaker)


class _Waiter:
  """Waits `poll_s` at a time for another process to prepare `path` (elected by
  `lock`), saying so every minute."""

  def __init__(self, path: str, lock: str, poll_s: float):
    self.path, self.lock, self.poll_s = path, lock, poll_s
    self.waited, self.logged = 0.0, 0.0

  def wait(self, holder: str = "") -> None:
    """Sleeps one poll; `holder`: who prepares, for the log ('' if unknown)."""
    if self.waited - self.logged >= 60:
      log.info("Waiting for another process%s to prepare %s (lock %s, %.0f s).",
               f" ({holder})" if holder else "", self.path, self.lock, self.waited)
      self.logged = self.waited
    time.sleep(self.poll_s)
    self.waited += self.poll_s


def _run_once(path: str, prepare_fn, poll_s: float = 1.0) -> None:
  """Runs `prepare_fn` unless `path` is prepared, in one process at a time.

  A lock file next to `path` (O_EXCL) elects the preparing process; the others wait until
  the data appears, and take over if the lock goes away without it (the preparer failed).
  A lock left by a dead process on this host (its pid gone, or now another process's:
  the lock holds the holder's start time) is removed; one left by another host must be
  removed by hand (the message says where). On a data_dir that hosts do not share, each
  host prepares its own copy. Local paths only (`_run_once_leased` for buckets).
  """
  lock = os.fspath(paths.path(path)) + ".lock"
  os.makedirs(os.path.dirname(lock), exist_ok=True)
  waiter = _Waiter(path, lock, poll_s)
  while not pipeline.is_prepared(path):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      if _held_by_dead_process(lock) and _remove_stale_lock(lock):
        continue
      waiter.wait()
      continue
    try:
      with os.fdopen(fd, "w") as f:
        f.write(_lock_text())
      if not pipeline.is_prepared(path):
        prepare_fn()
    finally:
      os.remove(lock)


def _run_once_leased(path: str, prepare_fn, poll_s: float, timeout_s: float) -> None:
  """Runs `prepare_fn(lock)` unless `path` (in a bucket) is prepared, in one process
  at a time, across hosts.

  The lock is a lease object `<path>.lock` (`lease_lib.ObjectLease`: created only if
  absent, its holder's host, pid, start time and a heartbeat every `timeout_s / 10`).
  The process that creates it prepares; the others wait until the data appears. A
  lock whose holder is dead (on this host: its process is gone; elsewhere: its
  heartbeat is older than `timeout_s`) is taken over, with a warning, by exactly one
  of them, and one released without the data (the preparer failed) is taken by the
  next. `prepare_fn` gets the held lease: a preparer that lost it (`lock.lost`: it
  was taken for dead and taken over) must not write the data, as another one does.
  """
  lock_path = os.fspath(paths.path(path)) + ".lock"
  waiter = _Waiter(path, lock_path, poll_s)
  while not pipeline.is_prepared(path):
    lock = lease_lib.ObjectLease(lock_path, timeout_s)
    holder = lock.try_acquire()
    if holder is not None:
      waiter.wait(holder.describe())
      continue
    try:
      if not pipeline.is_prepared(path):
        prepare_fn(lock)
    finally:
      lock.release()


def check_shards(path: paths.PathLike) -> None:
  """Checks that every ArrayRecord shard of the prepared dataset at `path` holds the
  records its `dataset_info.json` lists (a truncated shard holds fewer).

  Only the shards' indices are read (damaged record bytes are found, and named, when
  the record is read: `pipeline.NamedRecordSource`).

  Raises:
    pipeline.CorruptDataError: naming the shard file.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  info = tfds.builder_from_directory(os.fspath(paths.path(path))).info
  for split in info.splits.values():
    for shard in split.file_instructions:
      try:
        reader = array_record_module.ArrayRecordReader(shard.filename)
        found = reader.num_records()
        reader.close()
        problem = (None if found == shard.examples_in_shard else
                   f"holds {found} records, {split.name!r} lists {shard.examples_in_shard}")
      except Exception as e:  # pylint: disable=broad-except
        problem = f"cannot be opened ({type(e).__name__}: {e})"
      if problem:
        raise pipeline.CorruptDataError(
            f"shard {shard.filename} {problem}: it is truncated or damaged.")


def _build(data_config, num_workers: int) -> None:
  builder = builders.make_builder(data_config, num_workers=num_workers)
  log.info("Preparing %s into %s", data_config.dataset, builder.prepared_dir)
  builder.download_and_prepare()
  builder.write_report()
  try:
    check_shards(builder.prepared_dir)
  except pipeline.CorruptDataError as e:
    shutil.rmtree(builder.prepared_dir)  # its dataset_info.json would pass for prepared
    raise pipeline.CorruptDataError(
        f"{e} Removed {builder.prepared_dir}: prepare it again (a full or failing "
        "disk cuts shards short).") from None


def _upload_tree(local_dir: str, target: paths.PathLike, last: str) -> None:
  """Copies the files under the local `local_dir` to `target` (any path), the one named
  `last` after all the others."""
  files = sorted((os.path.relpath(os.path.join(folder, name), local_dir)
                  for folder, _, names in os.walk(local_dir) for name in names),
                 key=lambda rel: (os.path.basename(rel) == last, rel))
  target = paths.path(target)
  for rel in files:
    out = target / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(local_dir, rel), "rb") as src, out.open("wb") as dst:
      shutil.copyfileobj(src, dst, length=16 << 20)
    size, copied = os.path.getsize(os.path.join(local_dir, rel)), out.stat().length
    if copied != size:
      raise pipeline.CorruptDataError(f"copying {rel} to {out} gave {copied} bytes, not "
                                      f"{size}: the copy is truncated")


def _prepare_remote(data_config, num_workers: int, lock: lease_lib.ObjectLease) -> None:
  """Prepares into a local staging folder (`$TMPDIR`), then copies the dataset up,
  unless `lock` (`_run_once_leased`'s) was lost meanwhile.

  ArrayRecord files cannot be written to a bucket directly. `dataset_info.json` goes
  up last, so that readers (which wait for it) never see a half-copied split.
  """
  with tempfile.TemporaryDirectory(prefix="gta_jax_prepare_") as staging:
    local = data_config.copy_and_resolve_references()
    local.data_dir = staging
    _build(local, num_workers)
    target = builders.prepared_dir(data_config)
    if lock.lost.is_set():
      log.warning("Not copying the prepared dataset to %s: this process lost its lock "
                  "%s (logged above), so another one may prepare it; waiting for the "
                  "data.", target, lock.path)
      return
    log.info("Copying the prepared dataset to %s", target)
    _upload_tree(builders.prepared_dir(local), target, last=pipeline.INFO_FILE)


def prepare(data_config, *, num_workers: int | None = None) -> DatasetMeta:
  """Prepares `data_config.dataset` (a no-op when prepared) and returns its metadata.

  Raises:
    ValueError: a manual dataset that is not prepared and has no `manual_dir`.
  """
  path = builders.prepared_dir(data_config)
  workers = data_config.prepare_workers if num_workers is None else num_workers
  if not pipeline.is_prepared(path):
    if builders.needs_manual_dir(data_config.dataset) and not data_config.manual_dir:
      raise ValueError(_how_to_prepare(data_config))
    if data_config.manual_dir and not paths.is_local(data_config.manual_dir):
      raise ValueError(
          f"config.data.manual_dir={data_config.manual_dir!r}: the video decoders read "
          "local files only; copy the official files to this machine (e.g. `gcloud "
          "storage cp -r`) and point manual_dir there. data_dir may stay in a bucket.")
    if paths.is_local(path):
      _run_once(path, lambda: _build(data_config, workers))
    else:
      _run_once_leased(path, lambda lock: _prepare_remote(data_config, workers, lock),
                       _BUCKET_POLL_S, _BUCKET_LOCK_TIMEOUT_S)
  return pipeline.read_meta(path)


def prepare_dataset(config) -> DatasetMeta:
  """Prepares `config.data.dataset` if needed and checks `config.model.num_classes`.

  Safe to call from every process: one prepares, the others wait for it.

  Raises:
    ValueError: the dataset is not prepared and cannot be (no manual_dir), or
      `config.model.num_classes` differs from the dataset's class count.
  """
  meta = prepare(config.data)
  if config.get("task", "classification") == "retrieval":
    return meta  # no classifier: the class labels are metadata only
  want = config.model.num_classes
  if want != meta.num_classes:
    raise ValueError(
        f"config.model.num_classes is {want} but dataset {meta.name!r} ({meta.path}) has "
        f"{meta.num_classes} classes; set --config.model.num_classes={meta.num_classes}.")
  return meta
