"""Runs the multi-view eval step over a split and gathers one row per video.

Batches go to the devices two ahead of the step, and the outputs stay there until the
split is done: the host waits for the devices once per split.
"""

from typing import Callable, Dict, Iterable

import jax
import numpy as np

from gta_jax.training import sharding
from gta_jax.training import writers

OUTPUTS = ("probs", "features", "label", "video_index")


def predict(eval_step: Callable, variables, loader: Iterable, mesh, progress: bool = False
            ) -> Dict[str, np.ndarray]:
  """Class probabilities (and features) of every video of an eval loader, on every process.

  Args:
    eval_step: from `steps.make_eval_step(model, mesh)` (outputs replicated).
    variables: the model variables, replicated on `mesh`.
    loader: yields process-local batches with `video` `(B, V, T, H, W, 3)`,
      `label`, `mask` (False on padding) and `video_index`.
    mesh: the device mesh.
    progress: show a bar of the batches (on a terminal, process 0).

  Returns:
    `probs (N, K)`, `label (N,)` and `video_index (N,)`, sorted by video index;
    `features (N, C)` too if the step gives them.

  Raises:
    RuntimeError: if a video came twice (the loader's sharding is wrong).
  """
  batches = (dict(b, video_index=np.asarray(b["video_index"]).astype(np.int32))
             for b in loader)
  # The outputs stay on the devices until the split is done: one synchronisation.
  with writers.progress_bar(getattr(loader, "num_batches", None), 0, "batch",
                            disable=not progress) as bar:
    outputs = []
    for batch in sharding.DevicePrefetcher(batches, mesh):
      outputs.append(eval_step(variables, batch))
      bar.update(1)
  if not outputs:
    raise ValueError("the eval loader yielded no batches")
  outputs = jax.device_get(outputs)
  keep = np.concatenate([np.asarray(out["mask"]).astype(bool) for out in outputs])
  result = {k: np.concatenate([np.asarray(out[k]) for out in outputs])[keep]
            for k in OUTPUTS if k in outputs[0]}
  order = np.argsort(result["video_index"], kind="stable")
  result = {k: v[order] for k, v in result.items()}
  index = result["video_index"]
  if len(index) > 1 and np.any(index[1:] == index[:-1]):
    raise RuntimeError(f"videos evaluated more than once: "
                       f"{np.unique(index[1:][index[1:] == index[:-1]])[:10]}")
  return result
