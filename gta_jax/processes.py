"""Whether a process of this host still runs, and short lock files: for locks and
leases left by dead processes."""

import contextlib
import os
import socket
import time


def start_time(pid: int) -> str:
  """The start time of process `pid` (field 22 of /proc/PID/stat); '' if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def alive(pid: int, start: str = "") -> bool:
  """Whether process `pid` runs (and, given `start`, is the one that started then,
  not a later process that reuses the pid)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it runs, as another user
  return not start or start_time(pid) in ("", start)


def ended(host: str, pid: int, start: str = "") -> bool:
  """Whether process `pid` of `host`, started at `start` (:func:`start_time`'s; ''
  if unknown), is known to have ended. Only this host's processes can be checked:
  False for another host's."""
  return host == socket.gethostname() and not alive(pid, start)


def take_lock_file(path: str, stale_s: float) -> bool:
  """Creates the lock file `path` (O_EXCL); False if another process holds it. For
  locks held a moment only: one older than `stale_s` was left by a killed process
  and is removed first."""
  with contextlib.suppress(FileNotFoundError):
    if time.time() - os.path.getmtime(path) > stale_s:
      os.remove(path)
  try:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False
