"""Jitted retrieval steps: training on (clip, caption) pairs, embedding for evaluation.

* :func:`make_train_step` -> `step(state, batch) -> (state, metrics)`, `batch` =
  `video (B, T, H, W, 3)` (or a frozen network's `features (B, C)`),
  `video_index (B,)` and the caption's text fields
  (`tokens`, `token_mask` or `vectors`). The batch's other captions are the
  negatives of each clip (pairs of the same video excepted), and the other clips those
  of each caption. `accuracy` is the share of captions whose own clip scores highest.
* :func:`make_video_step` -> `step(variables, batch)`: `batch['video']` is
  `(B, V, T, H, W, 3)`; `features` is the embedding averaged over the V views,
  normalised again. With a frozen video network the batch holds its cached
  `features (B, C)` instead.
* :func:`make_text_step` -> `step(variables, batch)`: `features` is the caption's
  embedding.

Both embedding steps pass `mask` and `video_index` through, as
`gta_jax.evaluation.evaluator.predict` expects.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gta_jax.retrieval import losses
from gta_jax.retrieval import model as model_lib
from gta_jax.training import sharding
from gta_jax.training import steps

TEXT_KEYS = ("tokens", "token_mask", "vectors")
PASSED = ("mask", "video_index", "label")


def text_fields(batch) -> dict:
  return {k: batch[k] for k in TEXT_KEYS if k in batch}


def video_input(batch) -> jax.Array:
  """A batch's video side: normalised clips, or a frozen network's `features`."""
  return batch["features"] if "features" in batch else steps.prepare_video(batch["video"])


def make_train_step(model: model_lib.RetrievalModel, tx: optax.GradientTransformation, *,
                    loss: str, margin: float,
                    learning_rate_fn: Optional[Callable[[Any], Any]] = None,
                    dropout_seed: int = 0, mesh: Optional[Mesh] = None) -> Callable:
  """A jitted step of the retrieval loss `loss` (`losses.LOSSES`)."""
  if loss not in losses.LOSSES:
    raise ValueError(f"config.retrieval.loss must be one of {losses.LOSSES}, got {loss!r}")

  def loss_fn(params, batch_stats, batch, rng):
    (videos, texts, scale), updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        video_input(batch), text_fields(batch), train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    scores = videos @ texts.T
    index = batch["video_index"]
    same = (index[:, None] == index[None, :]) & ~jnp.eye(len(index), dtype=bool)
    value = losses.loss(loss, scores, same, margin=margin, scale=scale)
    own = jnp.argmax(jnp.where(same, -jnp.inf, scores), axis=0) == jnp.arange(len(index))
    return value, ({"accuracy": jnp.mean(own)}, updates)

  return steps.make_update_step(loss_fn, tx, learning_rate_fn=learning_rate_fn,
                                dropout_seed=dropout_seed, mesh=mesh)


def _jit(step: Callable, mesh: Optional[Mesh]) -> Callable:
  if mesh is None:
    return jax.jit(step)
  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=rep)


def make_video_step(model: model_lib.RetrievalModel, mesh: Optional[Mesh] = None
                    ) -> Callable:
  """Embeds each video's views and averages them (see the module docstring)."""

  def video_step(variables, batch):
    out = {k: batch[k] for k in PASSED if k in batch}
    embed = lambda x: model.apply(variables, x, method=model_lib.RetrievalModel.embed_video)
    if "features" in batch:  # a frozen network's, views averaged already
      out["features"] = embed(batch["features"])
      return out
    video = batch["video"]
    b, v = video.shape[:2]
    emb = embed(steps.prepare_video(video.reshape((b * v,) + video.shape[2:])))
    out["features"] = model_lib.l2_normalize(emb.reshape(b, v, -1).mean(axis=1))
    return out

  return _jit(video_step, mesh)


def make_text_step(model: model_lib.RetrievalModel, mesh: Optional[Mesh] = None
                   ) -> Callable:
  """Embeds captions (see the module docstring)."""

  def text_step(variables, batch):
    out = {k: batch[k] for k in PASSED if k in batch}
    out["features"] = model.apply(variables, text_fields(batch),
                                  method=model_lib.RetrievalModel.embed_text)
    return out

  return _jit(text_step, mesh)
