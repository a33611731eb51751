"""The attention core shared by the temporal modules (SSA, GTA, Non-local).

Every softmax attention in the project goes through :func:`attend`, a single-head
`softmax(scale q k^T) v`, which takes one of four implementations
(`gta_jax.models.backend` decides, from the platform and
`config.model.attention_impl`):

* `custom` (CPU): a hand-written gradient, below.
* `xla`: `jax.nn.dot_product_attention(implementation='xla')`, the softmax
  differentiated by JAX (GPU and TPU where no kernel applies).
* `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused
  attention (GPU; bf16/fp16, head size <= 128 and a multiple of 8).
* `pallas`: the Pallas TPU flash-attention kernel
  (`jax.experimental.pallas.ops.tpu.flash_attention`; lengths that divide by 128).

Logits and softmax are float32 whatever the input dtype, in every implementation.
Unscaled logits (`scale=1`: SSA, the original Non-local) are dot products over
hundreds to thousands of channels, large enough that the rounding of a TF32 (GPU)
or one-pass bf16 (TPU) float32 matmul moves the softmax: their matmuls run at
`Precision.HIGHEST` (in `xla`, the whole attention does).

The `custom` implementation has two modes:

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

Both avoid what makes the HW x HW attention of SSA expensive on XLA:CPU when the
softmax is differentiated as written (the `xla` implementation): the L x L
transposes and several elementwise passes over the scores; against it, the
SSA-R50 train step at 224px is 27% faster in the recompute mode
(benchmarks/README.md).
"""

import contextlib
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from gta_jax.models import backend

HIGHEST = jax.lax.Precision.HIGHEST


def _logits_precision(scale: float) -> Optional[jax.lax.Precision]:
  """`HIGHEST` for unscaled logits, else the default."""
  return HIGHEST if scale == 1.0 else None


def _matmul(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int,
            precision: Optional[jax.lax.Precision] = None) -> jax.Array:
  """Batched (over axis 0) `a . b` over one axis each, accumulated in float32."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))),
                             precision=precision, preferred_element_type=jnp.float32)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, *,
           scale: Optional[float] = None, save_probs: bool = False,
           implementation: Optional[str] = None) -> jax.Array:
  """Single-head softmax attention over the second axis.

  Args:
    query: `(N, Lq, D)`.
    key: `(N, Lk, D)`.
    value: `(N, Lk, Dv)`.
    scale: multiplier of the logits; `None` means `1/sqrt(D)`, `1.0` gives the
      unscaled dot product of the original embedded-Gaussian formulation.
    save_probs: `custom` only: keep the `(N, Lq, Lk)` softmax for the backward
      pass instead of recomputing it there: faster, and `N * Lq * Lk` values
      more memory.
    implementation: `custom`, `xla`, `cudnn` or `pallas`; `None` lets
      `backend.attention_impl` choose. The fused ones need `Dv == D`; other
      shapes take `custom`.

  Returns:
    `(N, Lq, Dv)`, `softmax(scale * q k^T) v` in the dtype of `value`.
  """
  d = query.shape[-1]
  scale = float(1.0 / d**0.5 if scale is None else scale)
  impl = implementation or backend.attention_impl(
      query.dtype, d, query.shape[1], key.shape[1])
  if impl == "custom" or value.shape[-1] != d:
    attend_fn = _attend_saving_probs if save_probs else _attend
    return attend_fn(query, key, value, scale)
  precision = _logits_precision(scale)
  with (jax.default_matmul_precision(precision.name.lower()) if precision
        else contextlib.nullcontext()):
    if impl == "pallas":
      return _pallas_flash_attention(query, key, value, scale)
    heads = lambda a: a[:, :, None, :]  # (N, L, 1 head, D)
    return jax.nn.dot_product_attention(
        heads(query), heads(key), heads(value), scale=scale,
        implementation=impl)[:, :, 0, :].astype(value.dtype)


def _pallas_flash_attention(query, key, value, scale):
  """The Pallas TPU flash-attention kernel (imported here: TPU only)."""
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  out = flash_attention.flash_attention(query[:, None], key[:, None], value[:, None],
                                        sm_scale=scale)
  return out[:, 0].astype(value.dtype)


def _forward(query, key, value, scale):
  """Output, per-query log-sum-exp and softmax (in the dtype of `value`)."""
  logits = _matmul(query, key, 2, 2, _logits_precision(scale)) * scale  # (N, Lq, Lk)
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
  logits_t = _matmul(key, query, 2, 2, _logits_precision(scale)) * scale  # (N, Lk, Lq)
  probs_t = jnp.exp(logits_t - log_norm[:, None, :])
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
