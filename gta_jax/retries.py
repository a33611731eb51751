"""Retries of bucket requests: bounded, with exponential backoff, counted and logged.

A bucket answers 429 (too many requests) or 5xx now and then, or drops a connection
mid-body. Three clients talk to one for this project, and each retries on its own:

* gcsfs (every file read or written through `paths`/`etils.epath`: metrics, events,
  prepared data's metadata, orbax's metadata and JSON items) retries 408, 429, 500-504
  and dropped connections 6 times, sleeping 1-2 s, 2-3 s, 4-5 s, ..., and logs
  nothing above debug level. :func:`install` replaces that with :data:`POLICY`'s
  retries, each logged and counted.
* tensorstore (orbax's arrays) retries the same in C++, up to 32 times from 1 s to
  32 s (its `gcs_request_retries` context resource). :func:`install` puts
  :data:`POLICY` into the context orbax opens arrays with; tensorstore counts its
  retries in the metric `/tensorstore/kvstore/gcs/retries`.
* array_record's reader (prepared shards, through google-cloud-cpp) retries
  transient errors for up to 15 minutes with backoff from 1 s, and resumes a dropped
  download where it broke off; it cannot be configured or counted from Python. But
  it opens a shard by reading its last 1 MiB, and when such a read of a smaller
  shard drops, it resumes by asking for the last `1 MiB - received` bytes: the whole
  shard again, appended to what it has (a bucket answers a suffix longer than the
  object with all of it), and the shard reads as damaged ("Failed to read
  RiegeliPostscript" at its first read). Importing this module makes array_record
  open a remote shard again when opening or reading it fails, with :data:`POLICY`'s
  tries and waits, logged and counted (`array_record_open`); a shard that is really
  damaged still fails, only later. This happens at import, not in :func:`install`:
  grain's worker processes import this module through the data pipeline and open
  shards, but need not open a `paths.path` (which runs :func:`install`).

:data:`POLICY` comes from the environment, so that one setting reaches every entry
point (train, eval, prepare, predict) and its subprocesses:
`GTA_JAX_RETRY_ATTEMPTS` (tries per request, default 8), `GTA_JAX_RETRY_INITIAL_S`
(the first wait, 1) and `GTA_JAX_RETRY_MAX_S` (the longest wait, 32); or from
:func:`configure`. Each wait is `min(initial * 2**retry, max)`, times a random factor
in [0.5, 1].

:func:`install` runs on the first remote path (`paths.path`); :func:`counts` tells
what was retried, and a summary is logged at exit when anything was.
"""

import asyncio
import atexit
import collections
import dataclasses
import functools
import logging
import os
import random
import threading
import time
from typing import Dict

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Policy:
  """How often and how patiently a failed request is tried again."""
  attempts: int = 8
  initial_s: float = 1.0
  max_s: float = 32.0

  def __post_init__(self):
    if self.attempts < 1 or self.initial_s < 0 or self.max_s < self.initial_s:
      raise ValueError(f"bad retry policy {self} (GTA_JAX_RETRY_ATTEMPTS >= 1, "
                       "0 <= GTA_JAX_RETRY_INITIAL_S <= GTA_JAX_RETRY_MAX_S)")

  def delay(self, retry: int) -> float:
    """The wait before retry number `retry` (0 for the first)."""
    return min(self.initial_s * 2 ** retry, self.max_s) * random.uniform(0.5, 1.0)


def _from_environment() -> Policy:
  """:data:`POLICY` from `GTA_JAX_RETRY_*` (see the module docstring).

  Raises:
    ValueError: a value that is not a number, naming the variable.
  """
  default = Policy()

  def read(name, cast, value):
    text = os.environ.get(name)
    try:
      return cast(text) if text else value
    except ValueError:
      raise ValueError(f"{name}={text!r} is not {'an integer' if cast is int else 'a number'}"
                       f" (default {value})") from None

  return Policy(attempts=read("GTA_JAX_RETRY_ATTEMPTS", int, default.attempts),
                initial_s=read("GTA_JAX_RETRY_INITIAL_S", float, default.initial_s),
                max_s=read("GTA_JAX_RETRY_MAX_S", float, default.max_s))


POLICY = _from_environment()
_gcsfs_retries: collections.Counter = collections.Counter()  # by cause
_open_retries: collections.Counter = collections.Counter()  # array_record's, by cause
_installed = False
_lock = threading.Lock()


def _cause(error: Exception) -> str:
  """A short name for what failed: an HTTP status, or the exception's type."""
  code = getattr(error, "code", None) or getattr(error, "status", None)
  return str(code) if code else type(error).__name__


def _retriable(error: Exception) -> bool:
  from gcsfs import retry as gcsfs_retry  # pylint: disable=g-import-not-at-top
  if getattr(error, "status", None) == 404:  # aiohttp's ClientResponseError
    return False
  return gcsfs_retry.is_retriable(error)


def _retrying(request):
  """`request` (one of gcsfs's coroutine methods) retried under :data:`POLICY`."""

  @functools.wraps(request)
  async def wrapped(*args, **kwargs):
    for retry in range(POLICY.attempts):
      try:
        return await request(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        if retry == POLICY.attempts - 1 or not _retriable(e):
          raise
        delay = POLICY.delay(retry)
        with _lock:
          _gcsfs_retries[_cause(e)] += 1
          total = sum(_gcsfs_retries.values())
        log.warning("bucket request %s failed (%s: %s); try %d of %d in %.2f s (%d "
                    "retries so far)", request.__name__, type(e).__name__,
                    str(e)[:200], retry + 2, POLICY.attempts, delay, total)
        await asyncio.sleep(delay)

  return wrapped


def _install_gcsfs() -> None:
  """Swaps gcsfs's retry decorator for :func:`_retrying` on its request methods."""
  from gcsfs import core  # pylint: disable=g-import-not-at-top
  # `_request` makes nearly every call, `_get_file_request` downloads to a file, and
  # `_get_file_concurrent` (a large download in parts, checksummed at the end) retries
  # as a whole, its parts through `_request` as well.
  for name in ("_request", "_get_file_request", "_get_file_concurrent"):
    method = core.GCSFileSystem.__dict__.get(name)
    undecorated = getattr(method, "__wrapped__", None)
    if undecorated is None:  # another gcsfs: keep its own retries
      log.warning("gcsfs.GCSFileSystem.%s has no retry decorator to replace; gcsfs "
                  "retries it on its own", name)
      continue
    setattr(core.GCSFileSystem, name, _retrying(undecorated))


def _install_tensorstore() -> None:
  """Puts :data:`POLICY` into the tensorstore context of every orbax array."""
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  resource = {"max_retries": POLICY.attempts - 1, "initial_delay": f"{POLICY.initial_s}s",
              "max_delay": f"{POLICY.max_s}s"}
  # get_ts_context() copies one of these two (the second was built from the first).
  for context in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    context["gcs_request_retries"] = resource


class _ReopeningReader:
  """An array_record reader of a shard in a bucket that opens the shard again when
  opening it or reading from it fails (see the module docstring): a failed read
  leaves a riegeli reader failed for good.

  Thread-safe: grain's read threads share one. A failed reader is replaced once,
  however many threads it failed in, and closed when no thread uses it any more.
  """

  def __init__(self, open_reader, filename):
    self._open_reader, self._filename = open_reader, filename
    self._lock = threading.Lock()
    self._reader = None
    self._users = collections.Counter()  # threads using each reader
    self._retrying(lambda reader: None)

  def read(self, *args, **kwargs):
    return self._retrying(lambda reader: reader.read(*args, **kwargs))

  def close(self) -> None:
    with self._lock:
      reader, self._reader = self._reader, None
    if reader is not None:
      reader.close()

  def __getattr__(self, name):  # num_records, writer_options_string, ...
    if name.startswith("__"):  # protocols (copy, pickle) are not the reader's methods
      raise AttributeError(name)
    return lambda *args, **kwargs: self._retrying(
        lambda reader: getattr(reader, name)(*args, **kwargs))

  def _take(self):
    """The current reader (opened if there is none), counted as used."""
    with self._lock:
      if self._reader is None:
        self._reader = self._open_reader()
      self._users[self._reader] += 1
      return self._reader

  def _give_back(self, reader, failed: bool) -> None:
    """Ends a use of `reader`. A failed one stops being the current reader (unless
    another thread already replaced it), and a replaced one is closed by its last user."""
    with self._lock:
      self._users[reader] -= 1
      if failed and self._reader is reader:
        self._reader = None
      if self._reader is reader or self._users[reader]:
        return
      del self._users[reader]
    try:
      reader.close()
    except RuntimeError as e:  # a failed reader may report its failure again
      log.debug("closing the failed reader of %s: %s", self._filename, e)

  def _retrying(self, use):
    attempts = POLICY.attempts
    for retry in range(attempts):
      reader, failed = None, False
      try:
        reader = self._take()
        return use(reader)
      except RuntimeError as e:
        failed = True
        if retry == attempts - 1:
          raise
        error = e
      finally:
        if reader is not None:
          self._give_back(reader, failed)
      delay = POLICY.delay(retry)
      with _lock:
        _open_retries["array_record_open"] += 1
      log.warning("reading %s failed (%s); opening it again, try %d of %d in %.2f s",
                  self._filename, str(error)[:200], retry + 2, attempts, delay)
      time.sleep(delay)


def _reopening(create_reader):
  """array_record's `_create_reader(filename, ...)`: a :class:`_ReopeningReader` for
  a shard in a bucket."""

  @functools.wraps(create_reader)
  def wrapped(filename, *args, **kwargs):
    if "://" not in os.fspath(filename):
      return create_reader(filename, *args, **kwargs)
    return _ReopeningReader(lambda: create_reader(filename, *args, **kwargs), filename)

  return wrapped


def _install_array_record() -> None:
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  array_record_data_source._create_reader = _reopening(  # pylint: disable=protected-access
      array_record_data_source._create_reader)  # pylint: disable=protected-access


def install() -> None:
  """Applies :data:`POLICY` to gcsfs and orbax's tensorstore (once per process)."""
  global _installed
  with _lock:
    if _installed:
      return
    _installed = True
  _install_gcsfs()
  _install_tensorstore()
  atexit.register(_log_summary)


def configure(policy: Policy) -> None:
  """Makes `policy` this process's :data:`POLICY` (for the requests that follow)."""
  global POLICY
  POLICY = policy
  if _installed:
    _install_tensorstore()


def counts() -> Dict[str, int]:
  """The retries of this process so far: gcsfs's by cause (`gcsfs_503`,
  `gcsfs_ClientPayloadError`, ...), array_record's reopened shards
  (`array_record_open`) and tensorstore's (`tensorstore`)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  with _lock:
    out = {f"gcsfs_{cause}": n for cause, n in sorted(_gcsfs_retries.items())}
    out.update(_open_retries)
  for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/gcs/retries"):
    out["tensorstore"] = sum(v.get("value", 0) for v in metric["values"])
  return out


def _log_summary() -> None:
  retried = {k: n for k, n in counts().items() if n}
  if retried:
    log.warning("bucket requests retried in this process: %s", retried)


_install_array_record()
