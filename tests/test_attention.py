"""`gta_jax.models.attention.attend`, in each implementation, against an einsum
softmax attention differentiated by JAX in float64; the backend policy's choices."""

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from gta_jax.models import attention
from gta_jax.models import backend


def reference(query, key, value, scale):
  logits = jnp.einsum("nqd,nkd->nqk", query, key) * scale
  return jnp.einsum("nqk,nkv->nqv", jax.nn.softmax(logits, axis=-1), value)


def check_against_float64_reference(attend, lq, lk, d, dv, scale, batch=2):
  """`attend(q, k, v)` and its gradients, in float32, equal the reference's to 1e-5."""
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((batch, n, d)) for n in (lq, lk))
  v = rng.standard_normal((batch, lk, dv))
  cotangent = rng.standard_normal((batch, lq, dv))
  expected_scale = scale if scale is not None else 1 / np.sqrt(d)
  with jax.enable_x64(True):
    expected, vjp = jax.vjp(lambda *a: reference(*a, expected_scale),
                            *map(jnp.asarray, (q, k, v)))
    expected_grads = vjp(jnp.asarray(cotangent))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out, vjp = jax.vjp(attend, f32(q), f32(k), f32(v))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for grad, want, name in zip(vjp(f32(cotangent)), expected_grads, "qkv"):
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5, err_msg=name)


SHAPES = [(7, 5, 4, 4, None), (6, 6, 8, 8, 1.0), (3, 9, 16, 16, 0.3)]


@pytest.mark.parametrize("save_probs", [False, True])
@pytest.mark.parametrize("lq,lk,d,dv,scale", SHAPES + [(7, 5, 4, 3, None),
                                                      (3, 9, 16, 2, 0.3)])
def test_custom_value_and_gradients_match_the_reference(lq, lk, d, dv, scale, save_probs):
  check_against_float64_reference(
      functools.partial(attention.attend, scale=scale, save_probs=save_probs,
                        implementation="custom"), lq, lk, d, dv, scale)


@pytest.mark.parametrize("lq,lk,d,dv,scale", SHAPES)
def test_xla_value_and_gradients_match_the_reference(lq, lk, d, dv, scale):
  check_against_float64_reference(
      functools.partial(attention.attend, scale=scale, implementation="xla"),
      lq, lk, d, dv, scale)


def test_pallas_flash_attention_matches_the_reference_in_interpret_mode():
  # The TPU kernel, run by the Pallas interpreter on this CPU; lengths are
  # multiples of its 128-block.
  attend = functools.partial(attention.attend, scale=1.0, implementation="pallas")
  with pltpu.force_tpu_interpret_mode():
    check_against_float64_reference(attend, 128, 256, 8, 8, 1.0, batch=1)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN attention runs on a GPU only (benchmarks/device_check.py "
                           "checks it there against the same reference)")
def test_cudnn_matches_the_reference_in_bfloat16():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 64)), jnp.bfloat16) for _ in range(3))
  out = attention.attend(q, k, v, implementation="cudnn")
  want = reference(*(a.astype(jnp.float32) for a in (q, k, v)), 1 / 8)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2)


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


# -- the backend policy ------------------------------------------------------------


def choose(platform, impl="auto", dtype=jnp.bfloat16, head=64, lq=4096, lk=4096):
  return backend.attention_impl(dtype, head, lq, lk,
                                backend.Policy(platform, attention_impl=impl))


def test_auto_takes_each_platforms_implementation():
  assert choose("cpu") == "custom"
  assert choose("gpu") == "cudnn"
  assert choose("gpu", dtype=jnp.float32) == "xla"  # cuDNN: bf16/fp16 only
  assert choose("gpu", head=256) == "xla"  # head size above 128
  assert choose("gpu", head=60) == "xla"  # not a multiple of 8
  assert choose("tpu", lq=8 * 28 * 28, lk=8 * 28 * 28) == "pallas"  # 3D Non-local
  assert choose("tpu", lq=784, lk=784) == "xla"  # short: XLA's scores are small
  assert choose("tpu", lq=4100, lk=4100) == "xla"  # not a multiple of 128


def test_forced_implementations():
  for platform in backend.PLATFORMS:
    assert choose(platform, "custom") == "custom"
    assert choose(platform, "xla") == "xla"
  assert choose("gpu", "cudnn", dtype=jnp.float32) == "xla"
  assert choose("tpu", "pallas", lq=256, lk=128) == "pallas"
  for platform, impl in (("cpu", "cudnn"), ("tpu", "cudnn"), ("gpu", "pallas")):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs a"):
      choose(platform, impl)


def test_the_policy_follows_the_forced_platform_and_the_options():
  assert backend.current() == backend.Policy(jax.default_backend())
  with backend.force_platform("tpu"), backend.options("xla", cpu_kernels=False):
    assert backend.current() == backend.Policy("tpu", "xla", False)
  with backend.force_platform("gpu"):
    assert not backend.current().use_cpu_kernels
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    with backend.options("flash"):
      pass


def test_unscaled_logits_are_computed_at_highest_precision():
  # The logits matmul's precision in each implementation's jaxpr (the backward
  # pass included): HIGHEST for scale 1, the default for 1/sqrt(d).
  q = jnp.ones((1, 8, 8))

  def precisions(impl, scale):
    loss = lambda q: attention.attend(q, q, q, scale=scale, implementation=impl).sum()
    text = str(jax.make_jaxpr(jax.grad(loss))(q))
    return text.count("Precision.HIGHEST")

  for impl in ("custom", "xla"):
    assert precisions(impl, None) == 0, impl
    assert precisions(impl, 1.0) > 0, impl


# -- bfloat16: a bound from the rounding, and a planted mistake that breaks it -------

U = 2.0**-9  # bfloat16's unit roundoff (eps / 2)


def bf16_inputs(d=64, length=32):
  """bf16 q, k, v with unscaled logits of std sqrt(d) = 8 (max about 30)."""
  rng = np.random.default_rng(3)
  return [jnp.asarray(rng.standard_normal((2, length, d)), jnp.bfloat16) for _ in range(3)]


def error_in_units_of_max_v(attend_fn):
  """max |attend_fn(q, k, v) - float32 attention of the same (bf16) values| / max |v|."""
  q, k, v = bf16_inputs()
  got = attend_fn(q, k, v)
  assert got.dtype == jnp.bfloat16
  with jax.default_matmul_precision("highest"):
    want = reference(*(a.astype(jnp.float32) for a in (q, k, v)), 1.0)
  return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) /
               jnp.max(jnp.abs(v.astype(jnp.float32))))


def softmax_in_bfloat16(q, k, v):
  """The planted mistake: logits and softmax in bf16."""
  return jnp.einsum("nqk,nkv->nqv", jax.nn.softmax(jnp.einsum("nqd,nkd->nqk", q, k)), v)


@pytest.mark.parametrize("impl", ["custom", "xla"])
def test_bfloat16_attention_is_within_two_roundings_of_float32(impl):
  # On inputs that bf16 holds exactly, products are exact and sums float32, so
  # the only rounding errors of size U are the softmax weights stored in bf16
  # (|dp| <= U p: |sum dp v| <= U max|v|) and the output (U |out| <= U max|v|):
  # |error| <= 2 U max|v|. Measured: 3.2e-3 against the bound's 3.9e-3.
  err = error_in_units_of_max_v(
      functools.partial(attention.attend, scale=1.0, implementation=impl))
  assert err <= 2 * U, err


def test_a_softmax_in_bfloat16_breaks_the_bound():
  # Logits rounded to bf16 are off by up to U |logit| (0.06 at 30), which
  # moves the weights by percents: measured 1.3e-2, 3.4x the bound above.
  err = error_in_units_of_max_v(softmax_in_bfloat16)
  assert err > 2 * (2 * U), err
