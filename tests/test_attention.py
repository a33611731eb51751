"""`gta_jax.models.attention.attend` against softmax attention differentiated by JAX."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gta_jax.models import attention


def reference(query, key, value, scale):
  logits = jnp.einsum("nqd,nkd->nqk", query, key) * scale
  return jnp.einsum("nqk,nkv->nqv", jax.nn.softmax(logits, axis=-1), value)


@pytest.mark.parametrize("save_probs", [False, True])
@pytest.mark.parametrize("lq,lk,d,dv,scale", [(7, 5, 4, 3, None), (6, 6, 8, 8, 1.0),
                                             (3, 9, 16, 2, 0.3)])
def test_value_and_gradients_match_autodiff_in_float64(lq, lk, d, dv, scale, save_probs):
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((2, n, d)) for n in (lq, lk))
  v = rng.standard_normal((2, lk, dv))
  cotangent = rng.standard_normal((2, lq, dv))
  expected_scale = scale if scale is not None else 1 / np.sqrt(d)
  with jax.enable_x64(True):
    expected, vjp = jax.vjp(lambda *a: reference(*a, expected_scale),
                            *map(jnp.asarray, (q, k, v)))
    expected_grads = vjp(jnp.asarray(cotangent))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out, vjp = jax.vjp(lambda *a: attention.attend(*a, scale=scale, save_probs=save_probs),
                     f32(q), f32(k), f32(v))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for grad, want, name in zip(vjp(f32(cotangent)), expected_grads, "qkv"):
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("save_probs", [False, True])
def test_large_logits_stay_finite(save_probs):
  # Logits of +-1e4: a naive exp overflows; the log-sum-exp form does not.
  q = jnp.full((1, 2, 1), 100.0)
  k = jnp.asarray([[[100.0], [-100.0], [99.0]]])
  v = jnp.asarray([[[1.0], [2.0], [3.0]]])
  out, grads = jax.value_and_grad(
      lambda *a: attention.attend(*a, scale=1.0, save_probs=save_probs).sum(),
      argnums=(0, 1, 2))(q, k, v)
  assert np.isfinite(out) and all(np.isfinite(g).all() for g in grads)
  np.testing.assert_allclose(out, 2.0, rtol=1e-6)  # all weight on the first key


@pytest.mark.parametrize("save_probs", [False, True])
def test_bfloat16_inputs_give_bfloat16_output_close_to_float32(save_probs):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32) for _ in range(3))
  attend = functools.partial(attention.attend, save_probs=save_probs)
  bf16 = lambda arrays: [a.astype(jnp.bfloat16) for a in arrays]
  out = attend(*bf16((q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), attend(q, k, v),
                             rtol=0.05, atol=0.05)
  cotangent = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
  loss = lambda *a: jnp.sum(attend(*a).astype(jnp.float32) * cotangent)
  grads = jax.grad(loss, argnums=(0, 1, 2))(*bf16((q, k, v)))
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  for grad, want, name in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v), "qkv"):
    np.testing.assert_allclose(grad.astype(jnp.float32), want, rtol=0.1, atol=0.1,
                               err_msg=name)


def test_saving_the_softmax_keeps_it_for_the_backward_pass():
  # The residuals of the two modes: the (N, Lq, Lk) softmax only when saved.
  q, k, v = (jnp.ones((2, 12, 4)) for _ in range(3))
  for save_probs, has_scores in ((False, False), (True, True)):
    _, vjp = jax.vjp(functools.partial(attention.attend, save_probs=save_probs), q, k, v)
    shapes = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    assert ((2, 12, 12) in shapes) == has_scores, shapes
