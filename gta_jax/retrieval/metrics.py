"""Text-video retrieval metrics: ranks of the true items, computed blockwise on the devices.

The score of a caption and a video is the dot product of their embeddings.

* Text to video: each caption queries all videos; its rank is 1 + the number of
  *other* videos that score at least as high as its own video.
* Video to text: each video queries all captions; its rank is that of its best
  caption (the highest score among its own captions): 1 + the number of captions of
  *other* videos that score at least as high. Its other captions never push it down.

Ties count against the model: the true item ranks below every wrong item with an
equal score, so that a degenerate embedding cannot score well (CLIP4Clip's
`metrics.py` has no tie policy: there a query with ties counts once per tied item).
R@K is the share of queries with rank <= K, MedR and MeanR the median and mean rank.

Neither the host nor a device ever holds the whole score matrix: the queries go
through in blocks of rows, each block's scores computed against the whole gallery
(replicated on every device) and reduced to ranks at once. The true and best scores
come from the same block product as the scores they are compared with, so exact
ties (duplicate vectors) stay exact.
"""

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, Sharding
import numpy as np

from gta_jax.training import sharding

ArrayLike = Any  # a numpy array or a jax.Array


def _rank_block(queries: jax.Array, query_ids: jax.Array, gallery: jax.Array,
                gallery_ids: jax.Array) -> jax.Array:
  """Ranks of a block of queries: 1 + the foreign gallery items scoring >= the best own.

  A gallery item is the query's own when its id equals the query's id: the one true
  video of a caption (text to video), the captions of a video (video to text). A
  query with no own item (padding, id -1) gets `1 + len(gallery)`.
  """
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
  own = gallery_ids[None, :] == query_ids[:, None]
  best = jnp.max(jnp.where(own, scores, -jnp.inf), axis=1, keepdims=True)
  return 1 + jnp.sum((scores >= best) & ~own, axis=1, dtype=jnp.int32)


def _put(x: np.ndarray, target: Sharding) -> jax.Array:
  """Places a host array, identical on every process, with `target`'s layout."""
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def _blockwise_ranks(queries: np.ndarray, query_ids: np.ndarray, gallery: np.ndarray,
                     gallery_ids: np.ndarray, mesh: Optional[Mesh],
                     block_size: int) -> np.ndarray:
  """`_rank_block` over blocks of `block_size` queries (rounded up to a multiple of the
  device count; fewer when there are fewer queries); the padding rows are dropped."""
  count = len(queries)
  devices = 1 if mesh is None else mesh.size
  rows = -(-min(block_size, count) // devices) * devices
  padded = -(-count // rows) * rows
  queries = np.pad(queries, ((0, padded - count), (0, 0)))
  query_ids = np.pad(query_ids, (0, padded - count), constant_values=-1)
  if mesh is None:
    step = jax.jit(_rank_block)
    put_rows = put_all = jax.device_put
  else:
    rows_sharding, rep = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    step = jax.jit(_rank_block, in_shardings=(rows_sharding, rows_sharding, rep, rep),
                   out_shardings=rep)
    put_rows = lambda x: _put(x, rows_sharding)
    put_all = lambda x: sharding.replicate(x, mesh)
  gallery, gallery_ids = put_all(gallery), put_all(gallery_ids)
  blocks = [
      step(put_rows(queries[start:start + rows]), put_rows(query_ids[start:start + rows]),
           gallery, gallery_ids) for start in range(0, padded, rows)
  ]
  return np.concatenate([np.asarray(b) for b in blocks])[:count]


def ranks(video_emb: ArrayLike, text_emb: ArrayLike, caption_video: ArrayLike, *,
          mesh: Optional[Mesh] = None, block_size: int = 1024) -> Dict[str, np.ndarray]:
  """1-based ranks of the true items in both directions (module docstring).

  Args:
    video_emb: `(Nv, D)` float embeddings of the videos (numpy or jax; in a
      multi-process run, the same host arrays on every process).
    text_emb: `(Nt, D)` float embeddings of the captions.
    caption_video: `(Nt,)` ints, the video of each caption; every video has at least
      one caption.
    mesh: if given (axis `data`), each block's rows are split over its devices, the
      gallery replicated; otherwise everything runs on the default device.
    block_size: query rows per block (rounded up to a multiple of the device count).
      The largest intermediate is a `(block_size, gallery size)` float32 matrix,
      split over the devices.

  Returns:
    `t2v`: int32 `(Nt,)`, the rank of each caption's video; `v2t`: int32 `(Nv,)`,
    the rank of each video's best caption. Numpy arrays, on every process.

  Raises:
    ValueError: shapes that do not match, non-finite embeddings, a caption of a
      video outside `[0, Nv)`, a video without captions, or a block size below 1.
  """
  videos = np.asarray(video_emb, np.float32)
  texts = np.asarray(text_emb, np.float32)
  owner = np.asarray(caption_video)
  if videos.ndim != 2 or texts.ndim != 2 or videos.shape[1] != texts.shape[1]:
    raise ValueError(f"video_emb {videos.shape} and text_emb {texts.shape} must be "
                     "(Nv, D) and (Nt, D)")
  if owner.shape != (len(texts),) or not np.issubdtype(owner.dtype, np.integer):
    raise ValueError(f"caption_video must be ({len(texts)},) ints, one per caption, "
                     f"got {owner.dtype} {owner.shape}")
  if not len(videos):
    raise ValueError("no videos to rank")
  if owner.min() < 0 or owner.max() >= len(videos):
    raise ValueError(f"caption_video holds videos outside [0, {len(videos)}): "
                     f"{owner.min()}..{owner.max()}")
  uncaptioned = np.flatnonzero(np.bincount(owner, minlength=len(videos)) == 0)
  if len(uncaptioned):
    raise ValueError(f"{len(uncaptioned)} videos have no caption, e.g. video "
                     f"{uncaptioned[0]}")
  if not (np.isfinite(videos).all() and np.isfinite(texts).all()):
    raise ValueError("the embeddings hold NaN or infinite values")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  owner = owner.astype(np.int32)
  video_ids = np.arange(len(videos), dtype=np.int32)
  return {
      "t2v": _blockwise_ranks(texts, owner, videos, video_ids, mesh, block_size),
      "v2t": _blockwise_ranks(videos, video_ids, texts, owner, mesh, block_size),
  }


def summarize(ranks: Dict[str, np.ndarray]) -> Dict[str, float]:
  """R@1, R@5, R@10 (fractions), MedR and MeanR per direction, and their R@K sum.

  Args:
    ranks: the output of :func:`ranks`.

  Returns:
    `t2v_r1, t2v_r5, t2v_r10, t2v_medr, t2v_meanr`, the same five for `v2t_`,
    `rsum` (the six R@K added up, at most 6), `num_videos`, `num_captions`: plain
    Python numbers.
  """
  out = {}
  for direction in ("t2v", "v2t"):
    r = np.asarray(ranks[direction])
    for k in (1, 5, 10):
      out[f"{direction}_r{k}"] = float(np.mean(r <= k))
    out[f"{direction}_medr"] = float(np.median(r))
    out[f"{direction}_meanr"] = float(np.mean(r))
  out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
  out["num_videos"] = int(len(ranks["v2t"]))
  out["num_captions"] = int(len(ranks["t2v"]))
  return out
