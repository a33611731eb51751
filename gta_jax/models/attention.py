"""The attention core shared by the temporal modules (SSA, GTA, Non-local).

Every softmax attention in the project goes through :func:`attend`, a single-head
`softmax(scale q k^T) v` with a hand-written gradient:

* The forward pass keeps only `q, k, v`, the output and each query's log-sum-exp
  of the logits, O(L D) memory, never the L x L scores or softmax.
* The backward pass recomputes the scores once, transposed (keys x queries), from
  which `dv = P^T do`, `dk = dS^T q` and `dq^T = k^T dS^T` are plain matmuls: no
  L x L matrix is transposed, and the softmax gradient is one elementwise pass
  `dS = P (dP - rowsum(do * o))`.

This is what makes the HW x HW attention of SSA affordable: against
`jax.nn.dot_product_attention` (whose XLA path, the one it takes when no
implementation is named, differentiates the softmax as written and needs
`jax.checkpoint` to avoid storing the scores), the SSA-R50 train step at 224px is
27% faster on a 2-core CPU (benchmarks/README.md). Logits, softmax and their
gradients are float32 whatever the input dtype.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp


def _matmul(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """Batched (over axis 0) `a . b` over one axis each, accumulated in float32."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, *,
           scale: Optional[float] = None) -> jax.Array:
  """Single-head softmax attention over the second axis.

  Args:
    query: `(N, Lq, D)`.
    key: `(N, Lk, D)`.
    value: `(N, Lk, Dv)`.
    scale: multiplier of the logits; `None` means `1/sqrt(D)`, `1.0` gives the
      unscaled dot product of the original embedded-Gaussian formulation.

  Returns:
    `(N, Lq, Dv)`, `softmax(scale * q k^T) v` in the dtype of `value`.
  """
  if scale is None:
    scale = 1.0 / float(query.shape[-1]) ** 0.5
  return _attend(query, key, value, float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(query, key, value, scale):
  return _attend_fwd(query, key, value, scale)[0]


def _attend_fwd(query, key, value, scale):
  logits = _matmul(query, key, 2, 2) * scale  # (N, Lq, Lk)
  log_norm = jax.nn.logsumexp(logits, axis=-1)  # (N, Lq)
  probs = jnp.exp(logits - log_norm[..., None])
  out = _matmul(probs.astype(value.dtype), value, 2, 1).astype(value.dtype)
  return out, (query, key, value, out, log_norm)


def _attend_bwd(scale, residuals, d_out):
  query, key, value, out, log_norm = residuals
  probs_t = jnp.exp(_matmul(key, query, 2, 2) * scale - log_norm[:, None, :])  # (N, Lk, Lq)
  d_probs_t = _matmul(value, d_out, 2, 2)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_logits_t = probs_t * (d_probs_t - row_dot[:, None, :]) * scale
  d_value = _matmul(probs_t.astype(d_out.dtype), d_out, 2, 1)
  d_key = _matmul(d_logits_t.astype(query.dtype), query, 2, 1)
  d_query = jnp.swapaxes(_matmul(key, d_logits_t.astype(key.dtype), 1, 1), 1, 2)
  return (d_query.astype(query.dtype), d_key.astype(key.dtype),
          d_value.astype(value.dtype))


_attend.defvjp(_attend_fwd, _attend_bwd)
