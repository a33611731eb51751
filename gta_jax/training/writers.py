"""Run logs: `WORKDIR/metrics.jsonl`, TensorBoard events and a progress bar.

Only process 0 writes. Each JSON line is one object: train rows
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
from typing import Any, Dict

import jax
import tqdm
from absl import logging as absl_logging


class MetricWriter:
  """Appends metric rows to `metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, kind: str, step: int, values: Dict[str, Any], prefix: str) -> None:
    if not self.active:
      return
    row = {"kind": kind, "step": int(step), **values}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(f"{prefix}/{name}", value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def progress_bar(total: int, initial: int) -> tqdm.tqdm:
  """A tqdm bar (steps/s, ETA) on process 0 when stderr is a terminal."""
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0 or not sys.stderr.isatty())


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
