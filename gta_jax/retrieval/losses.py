"""Contrastive losses over a batch of matching (video, caption) pairs.

`scores (B, B)`: row `i` is video `i` against every caption of the batch, the
diagonal the matching pairs. `same (B, B)` marks the off-diagonal pairs that match
all the same (two captions of one video in a batch): they are no negatives.

* `max_margin`: the bidirectional max-margin ranking loss of HowTo100M (Miech et al.
  2019), `relu(margin + s_neg - s_pos)` for every negative in both directions. Ours
  averages over the negatives only; HowTo100M's `loss.py` averages over all `B^2`
  entries, the diagonal's constant `margin` included (the same gradient, scaled by
  `(B - 1) / B`).
* `infonce`: the symmetric InfoNCE of CLIP (Radford et al. 2021): cross-entropy of
  each row and each column of `scale * scores` against its diagonal.
"""

import jax
import jax.numpy as jnp
import optax

LOSSES = ("max_margin", "infonce")


def max_margin(scores: jax.Array, same: jax.Array, margin: float) -> jax.Array:
  pos = jnp.diagonal(scores)
  negative = ~same & ~jnp.eye(scores.shape[0], dtype=bool)
  video_to_text = jax.nn.relu(margin + scores - pos[:, None])
  text_to_video = jax.nn.relu(margin + scores - pos[None, :])
  total = jnp.sum(jnp.where(negative, video_to_text + text_to_video, 0.0))
  return total / jnp.maximum(2.0 * jnp.sum(negative), 1.0)


def infonce(scores: jax.Array, same: jax.Array, scale: jax.Array) -> jax.Array:
  logits = jnp.where(same, -jnp.inf, scale * scores)
  labels = jnp.arange(scores.shape[0])
  rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  columns = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (jnp.mean(rows) + jnp.mean(columns))


def loss(name: str, scores: jax.Array, same: jax.Array, *, margin: float,
         scale: jax.Array) -> jax.Array:
  """The loss `name` (one of `LOSSES`) of a batch's scores."""
  if name == "max_margin":
    return max_margin(scores, same, margin)
  if name == "infonce":
    return infonce(scores, same, scale)
  raise ValueError(f"config.retrieval.loss must be one of {LOSSES}, got {name!r}")
