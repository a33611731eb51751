"""Whether a process of this host still runs: for locks and leases left by dead ones."""

import os
import socket


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
