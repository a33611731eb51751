"""Run logs: `WORKDIR/metrics.jsonl`, TensorBoard events and a progress bar.

Only process 0 writes. The workdir may be a bucket (`gs://...`): objects there cannot
be appended to, so on a remote workdir `metrics.jsonl` is kept in memory and the
whole object rewritten, at most every `REMOTE_FLUSH_SECONDS` and on `flush()`
(the loop flushes after each checkpoint) and `close()`. Each JSON line is one object: train rows
(`kind='train'`) carry `step`, `loss`, `accuracy`, `lr`, `grad_norm`,
`examples_per_sec` and `steps_per_sec`; eval rows (`kind='eval'`) carry `step`,
`split`, `top1`, `top5`, `mean_class_accuracy`, `loss` and `num_videos`.
TensorBoard events go to `WORKDIR/tensorboard` (tensorboardX: no TensorFlow), as
`train/<name>` and `<split>/<name>` scalars.
"""

import json
import logging as py_logging
import os
import sys
import time
from typing import Any, Dict, Optional

import jax
import tqdm
from absl import logging as absl_logging

from gta_jax import paths

METRICS_FILE = "metrics.jsonl"
REMOTE_FLUSH_SECONDS = 30.0


class JsonLines:
  """An append-only text file of JSON rows, local or in a bucket.

  Locally rows are appended and flushed as they come. A remote object cannot be
  appended to: its rows (those already there included) are kept in memory and the
  object is rewritten by :meth:`flush`, and by :meth:`append` when the last rewrite is
  more than `flush_seconds` old.
  """

  def __init__(self, path: paths.PathLike, flush_seconds: float = REMOTE_FLUSH_SECONDS):
    self.path = paths.path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._local = paths.is_local(self.path)
    self._flush_seconds = flush_seconds
    if self._local:
      self._file = self.path.open("a", encoding="utf-8")
    else:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._flushed_at = time.monotonic()

  def append(self, row: Dict[str, Any]) -> None:
    line = json.dumps(row) + "\n"
    if self._local:
      self._file.write(line)
      self._file.flush()
      return
    self._text += line
    if time.monotonic() - self._flushed_at > self._flush_seconds:
      self.flush()

  def flush(self) -> None:
    if not self._local:
      self.path.write_text(self._text)
      self._flushed_at = time.monotonic()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self.flush()


class MetricWriter:
  """Appends metric rows to `metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: paths.PathLike):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    workdir = paths.path(workdir)
    self._jsonl = JsonLines(workdir / METRICS_FILE)
    self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"))

  def write(self, kind: str, step: int, values: Dict[str, Any], prefix: str) -> None:
    if not self.active:
      return
    self._jsonl.append({"kind": kind, "step": int(step), **values})
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(f"{prefix}/{name}", value, int(step))
    self._tb.flush()

  def flush(self) -> None:
    """Makes every row so far visible (on a bucket, rewrites `metrics.jsonl`)."""
    if self.active:
      self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def progress_bar(total: Optional[int], initial: int = 0, unit: str = "step",
                 disable: bool = False) -> tqdm.tqdm:
  """A tqdm bar (rate, ETA) on process 0 when stderr is a terminal."""
  return tqdm.tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                   disable=disable or jax.process_index() != 0 or not sys.stderr.isatty())


class _LibraryInfoFilter(py_logging.Filter):
  """Drops the INFO chatter of orbax, grain and tfds (warnings still pass)."""

  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}",
           f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno > py_logging.INFO or not any(
        part in record.pathname for part in self.NOISY)


def quiet_library_logs() -> None:
  """Keeps the CLIs' INFO logs to the project's own messages."""
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
