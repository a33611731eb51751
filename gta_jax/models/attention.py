"""Attention primitives shared by the temporal modules.

Every softmax attention in the project goes through :func:`attend`, which calls
``jax.nn.dot_product_attention`` so that fused kernels (cuDNN flash attention on GPU,
the XLA fusion elsewhere) serve where the backend has them, and the scores are never
materialised by our own code.
"""

from typing import Optional

import jax


def attend(query: jax.Array, key: jax.Array, value: jax.Array, *,
           scale: Optional[float] = None) -> jax.Array:
  """Single-head softmax attention over the second axis.

  Args:
    query: `(N, Lq, D)`.
    key: `(N, Lk, D)`.
    value: `(N, Lk, D)`.
    scale: multiplier of the logits; `None` means `1/sqrt(D)`, `1.0` gives the
      unscaled dot product of the original embedded-Gaussian formulation.

  Returns:
    `(N, Lq, D)`, `softmax(scale * q k^T) v` in the dtype of `value`.
  """
  if scale is None:
    scale = 1.0 / float(query.shape[-1]) ** 0.5
  out = jax.nn.dot_product_attention(
      query[:, :, None, :], key[:, :, None, :], value[:, :, None, :], scale=scale)
  return out[:, :, 0, :]
