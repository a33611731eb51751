"""One training run per workdir: a lease file, `WORKDIR/lease.json`.

A training run (process 0 of a multi-process run) takes the lease before it touches
the workdir and holds it until it ends; a thread rewrites its heartbeat every
`timeout_s / 10` seconds. A second run on the same workdir finds a live lease and
stops at once with :class:`WorkdirLeasedError`, naming the holder (host, process id,
start time). A lease is taken over, with a warning, when its holder is dead (on this
host: its process is gone) or its heartbeat is older than the longer of the two runs'
`timeout_s` (a holder on another host, or a hung one; the lease records its
holder's). A run whose lease was taken over, or whose lease file was damaged, stops
before its next checkpoint (:meth:`Lease.check`). Readers (`eval.py`, predict,
features) take no lease.

The file is only ever created with a create-only write, never by a read-then-write:
locally a hard link of a complete temporary file (fails if the lease exists); on a
bucket (`gs://`) an upload with the object store's precondition `ifGenerationMatch=0`.
Taking over and heartbeats replace the lease only if it is still the one read (its
token locally, under a short lock; its generation on a bucket), so of two runs that
both find a lease stale exactly one gets it.

The machinery is :class:`ObjectLease`, a lease at any file or object path;
:class:`Lease` is a workdir's. Dataset preparation into a bucket elects its
preparer with one (`data/preparation.py`).
"""

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional, Tuple

from gta_jax import paths
from gta_jax import processes

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"


class WorkdirLeasedError(RuntimeError):
  """Another live run holds the workdir's lease."""


class LeaseLostError(WorkdirLeasedError):
  """This run lost its workdir's lease to another run (`Lease.check`)."""


class LeaseFileError(WorkdirLeasedError):
  """The lease file cannot be read (damaged) or created (no hard links)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lease: the contents of the lease file."""
  host: str
  pid: int
  started: float  # time.time() when it took the lease
  heartbeat: float  # time.time() of its last heartbeat
  token: str  # this holding's identity
  pid_start: str = ""  # the process's start time in clock ticks (Linux), against pid reuse
  timeout_s: float = 0.0  # its own lease timeout (it beats every timeout_s / 10); 0: unknown

  @classmethod
  def me(cls, timeout_s: float) -> "Holder":
    now = time.time()
    return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex,
               processes.start_time(os.getpid()), timeout_s)

  def encode(self) -> bytes:
    return json.dumps(dataclasses.asdict(self)).encode()

  @classmethod
  def decode(cls, data: bytes, path: str) -> "Holder":
    """The holder of the lease file `path`, which holds `data`.

    Raises:
      LeaseFileError: `data` is not a lease, naming `path`.
    """
    try:
      return cls(**json.loads(data))
    except (ValueError, TypeError) as e:  # not JSON, not an object, other fields
      raise LeaseFileError(
          f"the lease file {path} is damaged ({type(e).__name__}: {e}): check that no "
          "run holds it, then delete it") from None

  def describe(self) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
    return (f"host {self.host}, process {self.pid}, started {started}, last heartbeat "
            f"{time.time() - self.heartbeat:.0f} s ago")

  def patience_s(self, timeout_s: float) -> float:
    """How long a contender with `timeout_s` waits for this holder's heartbeat: the
    longer of the two timeouts (a holder beats every tenth of its own)."""
    return max(timeout_s, self.timeout_s)

  def is_dead(self, timeout_s: float) -> Optional[str]:
    """Why this holder is dead to a contender with `timeout_s` (None if it may be
    alive)."""
    if processes.ended(self.host, self.pid, self.pid_start):
      return f"its process {self.pid} on this host is gone"
    if time.time() - self.heartbeat > self.patience_s(timeout_s):
      return f"its heartbeat is older than {self.patience_s(timeout_s):.0f} s"
    return None


class _LocalStore:
  """The lease as a local file. Its version is the holder's token."""

  def __init__(self, path: str):
    self.path = path
    self._lock = path + ".lock"

  def create(self, data: bytes) -> Optional[str]:
    """Writes `data` if there is no lease; its version, or None if there is one."""
    temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(temporary, self.path)  # fails if the lease exists
      return Holder.decode(data, self.path).token
    except FileExistsError:
      return None
    except OSError as e:
      raise LeaseFileError(
          f"cannot create the lease file {self.path} as a hard link ({e}): its "
          "filesystem has none (a bucket mounted with gcsfuse?). Give the workdir as "
          "gs://BUCKET/... instead of the mount, or use a local workdir.") from None
    finally:
      os.remove(temporary)

  def read(self) -> Optional[Tuple[Holder, str]]:
    """The lease's holder and version; None if there is no lease.

    Raises:
      LeaseFileError: the lease file is damaged.
    """
    try:
      with open(self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return None
    holder = Holder.decode(data, self.path)
    return holder, holder.token

  def replace(self, version: str, data: Optional[bytes]) -> Optional[str]:
    """Replaces the lease by `data` (None: deletes it) if its version is `version`;
    the new version ('' when deleted), or None if the lease was another."""
    with self._locked():
      current = self.read()
      if current is None or current[1] != version:
        return None
      if data is None:
        os.remove(self.path)
        return ""
      temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
      with open(temporary, "wb") as f:
        f.write(data)
      os.replace(temporary, self.path)
      return Holder.decode(data, self.path).token

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    """A short exclusive section: an O_EXCL lock file (one older than 30 s, left by
    a killed process, is removed)."""
    deadline = time.time() + 60
    while not processes.take_lock_file(self._lock, stale_s=30):
      if time.time() > deadline:
        raise TimeoutError(f"cannot lock {self._lock}")
      time.sleep(0.05)
    try:
      yield
    finally:
      os.remove(self._lock)


class _BucketStore:
  """The lease as an object in a bucket (gcsfs). Its version is its generation, and
  every write is conditional on it (`ifGenerationMatch`; 0: the object must not
  exist), so it is atomic on the object store's side."""

  def __init__(self, url: str):
    import fsspec  # pylint: disable=g-import-not-at-top
    self.fs = fsspec.filesystem("gs")
    self.url = url
    self.bucket, _, self.key = url.split("://", 1)[1].partition("/")

  def _upload(self, data: bytes, generation: str) -> Optional[str]:
    """Uploads `data` if the object's generation is `generation`; the new one, or
    None (412 Precondition Failed)."""
    endpoint = self.fs._location  # pylint: disable=protected-access
    try:
      uploaded = self.fs.call(
          "POST", f"{endpoint}/upload/storage/v1/b/{{}}/o", self.bucket,
          uploadType="media", name=self.key, ifGenerationMatch=generation, data=data,
          headers={"Content-Type": "application/octet-stream"}, json_out=True)
    except FileExistsError:  # gcsfs's name for 412
      return None
    finally:
      self.fs.invalidate_cache(self.url)
    return str(uploaded["generation"])

  def create(self, data: bytes) -> Optional[str]:
    """Uploads `data` if there is no lease; its generation, or None."""
    return self._upload(data, "0")

  def read(self) -> Optional[Tuple[Holder, str]]:
    """The lease's holder and generation; None if there is no lease.

    Raises:
      LeaseFileError: the lease object is damaged.
    """
    while True:
      try:
        generation = self._generation()
        data = self.fs.cat_file(self.url)
        if self._generation() == generation:  # not rewritten while read
          return Holder.decode(data, self.url), generation
      except FileNotFoundError:
        return None

  def _generation(self) -> str:
    self.fs.invalidate_cache(self.url)
    return str(self.fs.info(self.url)["generation"])

  def replace(self, version: str, data: Optional[bytes]) -> Optional[str]:
    """Replaces the lease by `data` (None: deletes it) if its generation is
    `version`; the new generation ('' when deleted), or None."""
    if data is not None:
      return self._upload(data, version)
    try:
      self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key,
                   ifGenerationMatch=version)
      return ""
    except (FileExistsError, FileNotFoundError):  # 412: another generation; 404: gone
      return None
    finally:
      self.fs.invalidate_cache(self.url)


class ObjectLease:
  """A lease at one file or object, `path` (local or `gs://...`): the module
  docstring's machinery, whatever the lease guards (:class:`Lease`: a workdir).

  `try_acquire` takes it, or names the live holder; while it is held, a thread
  rewrites its heartbeat every `timeout_s / 10` seconds and sets `lost` once another
  holder or nobody has it, or its file is damaged; `release` ends it. One object
  holds the lease once: to try again after a release, make another.

  Args:
    path: the lease file (its folder is made) or object.
    timeout_s: a heartbeat older than this (or than the holder's own timeout, if
      longer) marks a dead holder.
  """

  def __init__(self, path: paths.PathLike, timeout_s: float):
    if timeout_s <= 0:
      raise ValueError(f"a lease's timeout_s must be > 0, got {timeout_s!r}")
    target = paths.path(path)
    if paths.is_local(target):
      target.parent.mkdir(parents=True, exist_ok=True)
      self._store = _LocalStore(os.fspath(target))
    else:
      self._store = _BucketStore(os.fspath(target))
    self.path = os.fspath(target)
    self.timeout_s = float(timeout_s)
    self.holder: Optional[Holder] = None
    self._version: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.lost = threading.Event()  # set when this process lost the lease
    self._lost = ""  # why: logged, and raised by `Lease.check`

  def try_acquire(self) -> Optional[Holder]:
    """Takes the lease (over a dead holder's, with a warning) and starts heartbeats.

    Returns:
      None once this process holds it; the live holder that has it otherwise (then
      nothing was started).

    Raises:
      LeaseFileError: the lease file is damaged.
    """
    me = Holder.me(self.timeout_s)
    while True:
      self._version = self._store.create(me.encode())
      if self._version is not None:
        break
      current = self._store.read()
      if current is None:
        continue  # released meanwhile
      holder, version = current
      if holder.token == me.token:  # ours: our upload's answer was lost, its retry refused
        self._version = version
        break
      why = holder.is_dead(self.timeout_s)
      if why is None:
        return holder
      self._version = self._store.replace(version, me.encode())
      if self._version:
        log.warning("Took over the lease %s from a dead run (%s): %s.", self.path,
                    holder.describe(), why)
        break
    self.holder = me
    self._thread = threading.Thread(target=self._beat, name="gta_jax-lease",
                                    daemon=True)
    self._thread.start()
    return None

  def _beat(self) -> None:
    """Rewrites the heartbeat every `timeout_s / 10` s while the lease is held.

    A heartbeat that cannot be written (a bucket not reachable) is tried again at
    the next beat. The lease is lost (`lost` is set) once another process or nobody
    holds it, or once its file is damaged: then nothing tells this one whether
    another one does what the lease guards.
    """
    while not self._stop.wait(self.timeout_s / 10):
      beat = dataclasses.replace(self.holder, heartbeat=time.time())
      try:
        version = self._store.replace(self._version, beat.encode())
        current = None if version else self._store.read()
      except LeaseFileError as e:
        self._lose(self._damaged_message(e))
        return
      except Exception as e:  # pylint: disable=broad-except
        log.warning("Could not renew the lease %s (%s); trying again.", self.path, e)
        continue
      if current is not None and current[0].token == beat.token:
        version = current[1]  # ours: the answer to our upload was lost
      if not version:
        self._lose(self._taken_message(current[0].describe() if current else "nobody"))
        return
      self.holder, self._version = beat, version

  def _damaged_message(self, error: LeaseFileError) -> str:
    """Why the lease is lost when its file is damaged (`error` names the file)."""
    return f"this process lost the lease {self.path}: {error}."

  def _taken_message(self, holder: str) -> str:
    """Why the lease is lost when `holder` (described; 'nobody') has it now."""
    return (f"this process lost the lease {self.path}: it is now held by {holder}. Its "
            "heartbeat had stopped for longer than the lease timeout (a hung process, "
            "or a bucket it could not reach).")

  def _lose(self, why: str) -> None:
    """Gives the lease up: logs `why` once and sets `lost`."""
    self._lost = why
    log.error("%s", self._lost)
    self.holder = None  # release() leaves the lease file alone: it is not ours
    self.lost.set()

  def release(self) -> None:
    """Stops the heartbeats and deletes the lease (if this process still holds it).

    Never raises (it runs in `finally`: the caller's own error must not be
    replaced): a lease it cannot delete is logged, and the next contender takes it
    over once it sees its holder dead.
    """
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.holder is not None:
      try:
        self._store.replace(self._version, None)
      except Exception as e:  # pylint: disable=broad-except
        log.warning("Could not delete the lease %s (%s: %s); the next contender takes "
                    "it over once it sees this process dead.", self.path,
                    type(e).__name__, e)
      self.holder = None


class Lease(ObjectLease):
  """The lease of `workdir`, `WORKDIR/lease.json` (see the module docstring).

  Args:
    workdir: the run's directory, local or `gs://...`.
    timeout_s: a heartbeat older than this marks a dead holder.
  """

  def __init__(self, workdir: paths.PathLike, timeout_s: float = 300.0):
    if timeout_s <= 0:
      raise ValueError(f"config.lease_timeout_s must be > 0, got {timeout_s!r}")
    super().__init__(paths.path(workdir) / LEASE_FILE, timeout_s)

  def acquire(self) -> "Lease":
    """Takes the lease (over a dead holder's, with a warning) and starts heartbeats.

    Raises:
      WorkdirLeasedError: a live holder has it.
    """
    holder = self.try_acquire()
    if holder is not None:
      raise WorkdirLeasedError(
          f"another run holds the workdir: {self.path} is held by {holder.describe()}. "
          "Stop that run, or use another --workdir (a lease whose holder died is "
          f"taken over; one on another host after {holder.patience_s(self.timeout_s):.0f}"
          " s without a heartbeat: the longer of the two runs' config.lease_timeout_s).")
    return self

  def _lost_prefix(self) -> str:
    return f"this run lost the lease of its workdir {os.path.dirname(self.path)}: "

  def _damaged_message(self, error: LeaseFileError) -> str:
    return (f"{self._lost_prefix()}{error}. This run stops before its next checkpoint, "
            "as it can no longer tell whether another run writes to its workdir.")

  def _taken_message(self, holder: str) -> str:
    return (f"{self._lost_prefix()}{self.path} is now held by {holder}, so it stops "
            "before its next checkpoint. Its heartbeat had stopped for longer than the "
            "lease timeout (a hung run, or a bucket it could not reach); raise "
            "config.lease_timeout_s if that was a pause, and use one workdir per run.")

  def check(self) -> None:
    """Raises if this run lost the lease: another run took it over, or its file was
    damaged (a training run checks before each checkpoint, so that two runs never
    write the same checkpoints).

    Raises:
      LeaseLostError: naming the workdir and the new holder or the damaged file.
    """
    if self.lost.is_set():
      raise LeaseLostError(self._lost)
