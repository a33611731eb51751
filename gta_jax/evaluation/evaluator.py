"""Runs the multi-view eval step over a split and gathers one row per video."""

from typing import Callable, Dict, Iterable

import numpy as np

from gta_jax.training import sharding


def predict(eval_step: Callable, variables, loader: Iterable, mesh
            ) -> Dict[str, np.ndarray]:
  """Class probabilities of every video of an eval loader, on every process.

  Args:
    eval_step: from `steps.make_eval_step(model, mesh)` (outputs replicated).
    variables: the model variables, replicated on `mesh`.
    loader: yields process-local batches with `video` `(B, V, T, H, W, 3)`,
      `label`, `mask` (False on padding) and `video_index`.
    mesh: the device mesh.

  Returns:
    `probs (N, K)`, `label (N,)` and `video_index (N,)`, sorted by video index.

  Raises:
    RuntimeError: if a video came twice (the loader's sharding is wrong).
  """
  chunks = {"probs": [], "label": [], "video_index": []}
  for batch in loader:
    batch = dict(batch, video_index=np.asarray(batch["video_index"]).astype(np.int32))
    out = eval_step(variables, sharding.shard_batch(batch, mesh))
    keep = np.asarray(out["mask"]).astype(bool)
    for k in chunks:
      chunks[k].append(np.asarray(out[k])[keep])
  if not chunks["probs"]:
    raise ValueError("the eval loader yielded no batches")
  result = {k: np.concatenate(v) for k, v in chunks.items()}
  order = np.argsort(result["video_index"], kind="stable")
  result = {k: v[order] for k, v in result.items()}
  index = result["video_index"]
  if len(index) > 1 and np.any(index[1:] == index[:-1]):
    raise RuntimeError(f"videos evaluated more than once: "
                       f"{np.unique(index[1:][index[1:] == index[:-1]])[:10]}")
  return result
