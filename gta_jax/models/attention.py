"""The attention core shared by the temporal modules (SSA, GTA, Non-local).

Every softmax attention in the project goes through :func:`attend`, a single-head
`softmax(scale q k^T) v` with a hand-written gradient, in one of two modes:

* Recompute (the default): the forward pass keeps only `q, k, v`, the output and
  each query's log-sum-exp of the logits, O(L D) memory, never the L x L scores
  or softmax. The backward pass recomputes the scores once, transposed (keys x
  queries), from which `dv = P^T do`, `dk = dS^T q` and `dq^T = k^T dS^T` are
  plain matmuls, and the softmax gradient is one elementwise pass
  `dS = P (dP - rowsum(do * o))`.
* `save_probs=True`: the forward pass also keeps the softmax `P` (L x L, in the
  dtype of `value`), and the backward pass needs no scores matmul and no `exp`:
  four matmuls, like the forward pass's two, differentiated. On a 2-core CPU the
  attention's forward and backward take 18-25% less time (784 to 3136 tokens),
  at the cost of `N * Lq * Lk` stored values.

Both avoid what makes the HW x HW attention of SSA expensive when the softmax is
differentiated as written (`jax.nn.dot_product_attention`'s XLA path): the L x L
transposes and several elementwise passes over the scores; against it, the
SSA-R50 train step at 224px is 27% faster in the recompute mode
(benchmarks/README.md). Logits, softmax and their gradients are float32 whatever
the input dtype.
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
           scale: Optional[float] = None, save_probs: bool = False) -> jax.Array:
  """Single-head softmax attention over the second axis.

  Args:
    query: `(N, Lq, D)`.
    key: `(N, Lk, D)`.
    value: `(N, Lk, Dv)`.
    scale: multiplier of the logits; `None` means `1/sqrt(D)`, `1.0` gives the
      unscaled dot product of the original embedded-Gaussian formulation.
    save_probs: keep the `(N, Lq, Lk)` softmax for the backward pass instead of
      recomputing it there: faster, and `N * Lq * Lk` values more memory.

  Returns:
    `(N, Lq, Dv)`, `softmax(scale * q k^T) v` in the dtype of `value`.
  """
  if scale is None:
    scale = 1.0 / float(query.shape[-1]) ** 0.5
  attend_fn = _attend_saving_probs if save_probs else _attend
  return attend_fn(query, key, value, float(scale))


def _forward(query, key, value, scale):
  """Output, per-query log-sum-exp and softmax (in the dtype of `value`)."""
  logits = _matmul(query, key, 2, 2) * scale  # (N, Lq, Lk)
  log_norm = jax.nn.logsumexp(logits, axis=-1)  # (N, Lq)
  probs = jnp.exp(logits - log_norm[..., None]).astype(value.dtype)
  out = _matmul(probs, value, 2, 1).astype(value.dtype)
  return out, log_norm, probs


def _row_dot(d_out, out):
  """`rowsum(do * o)`, the softmax gradient's per-query term, `(N, Lq)` float32."""
  return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def _recomputing_bwd(scale, residuals, d_out):
  """The gradient from q, k, v, the output and the log-sum-exp."""
  query, key, value, out, log_norm = residuals
  probs_t = jnp.exp(_matmul(key, query, 2, 2) * scale - log_norm[:, None, :])  # (N, Lk, Lq)
  d_probs_t = _matmul(value, d_out, 2, 2)
  d_logits_t = probs_t * (d_probs_t - _row_dot(d_out, out)[:, None, :]) * scale
  d_value = _matmul(probs_t.astype(d_out.dtype), d_out, 2, 1)
  d_key = _matmul(d_logits_t.astype(query.dtype), query, 2, 1)
  d_query = jnp.swapaxes(_matmul(key, d_logits_t.astype(key.dtype), 1, 1), 1, 2)
  return (d_query.astype(query.dtype), d_key.astype(key.dtype),
          d_value.astype(value.dtype))


def _saved_probs_bwd(scale, residuals, d_out):
  """The gradient from q, k, v, the output and the kept softmax."""
  query, key, value, out, probs = residuals  # probs: (N, Lq, Lk)
  d_probs = _matmul(d_out, value, 2, 2)
  d_logits = probs * (d_probs - _row_dot(d_out, out)[..., None]) * scale
  d_query = _matmul(d_logits.astype(key.dtype), key, 2, 1)
  d_key = _matmul(d_logits.astype(query.dtype), query, 1, 1)
  d_value = _matmul(probs, d_out.astype(probs.dtype), 1, 1)
  return (d_query.astype(query.dtype), d_key.astype(key.dtype),
          d_value.astype(value.dtype))


def _custom_attention(keep_probs: bool, backward):
  """`_forward`'s output with a hand-written gradient: the forward pass keeps
  q, k, v, the output, and the softmax (`keep_probs`) or the log-sum-exp."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def attend_fn(query, key, value, scale):
    return _forward(query, key, value, scale)[0]

  def forward(query, key, value, scale):
    out, log_norm, probs = _forward(query, key, value, scale)
    return out, (query, key, value, out, probs if keep_probs else log_norm)

  attend_fn.defvjp(forward, backward)
  return attend_fn


_attend = _custom_attention(False, _recomputing_bwd)
_attend_saving_probs = _custom_attention(True, _saved_probs_bwd)
