"""SSA (SSAN's Separable Self-Attention): the module against an einsum re-derivation
of Eqs. 6-8 for every switch, frame-order sensitivity, and R50 forward/backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradient_checks

from gta_jax import config_lib
from gta_jax.models import attention
from gta_jax.models import build_model
from gta_jax.models import ssa

SHAPE = (2, 4, 6, 6, 8)  # (B, T, H, W, C)


def _softmax(logits, xp):
  e = xp.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def reference_ssa(params, x, *, channel_branch=True, shared_value=True,
                  temporal_kernel=3, temporal_padding="zeros", scale="none",
                  residual=False, gate_init=0.0, reduction=1, temporal_heads=1,
                  temporal_bias=False, temporal_bias_init_std=0.02,
                  temporal_bias_init="random",
                  temporal_norm="softmax", temporal_logit_cap=0.0,
                  temporal_cosine_scale=0.0, spatial_chunk=0,
                  save_probs=True, xp=np, weights=False):
  """SSA written out from the paper's equations (eval mode, fresh BN statistics).

  `xp=np` runs it in float64 numpy; `xp=jnp` in float32 jax, for `jax.grad` (no
  custom VJP anywhere on that path). `weights=True` returns the `(B, heads, T, T)`
  softmax `M_T` instead of the output.
  """
  # scheduling and init, not the function
  del spatial_chunk, save_probs, gate_init, temporal_bias_init_std, temporal_bias_init
  if xp is np:
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
  p = params
  dense = lambda q, a: a @ q["kernel"] + q["bias"] if "bias" in q else a @ q["kernel"]
  b, t, h, w, c = x.shape
  d = c // reduction
  q, k, v = (dense(p[n], x) for n in ("query", "key", "value"))
  qf, kf, vf = (a.reshape(b, t, h * w, d) for a in (q, k, v))

  # Eq. 6: position branch (HW x HW) + channel branch (C x C), per frame.
  s_pos = 1.0 if scale == "none" else d ** -0.5
  m_s = _softmax(xp.einsum("btpc,btqc->btpq", qf, kf) * s_pos, xp)
  x_hat = xp.einsum("btpq,btqc->btpc", m_s, vf)
  if channel_branch:
    s_ch = 1.0 if scale == "none" else (h * w) ** -0.5
    m_c = _softmax(xp.einsum("btpi,btpj->btij", qf, kf) * s_ch, xp)
    x_hat = x_hat + xp.einsum("btpj,btij->btpi", vf, m_c)
  x_hat = x_hat.reshape(b, t, h, w, d)

  # Eq. 7: a (kt x 1 x 1) conv on x_hat, padded in time, gives q^, k^ (, v^).
  kernel = p["temporal_conv"]["kernel"][:, 0, 0]  # (kt, d, n * d)
  kt = kernel.shape[0]
  assert kt == temporal_kernel
  mode = {"zeros": "constant", "edge": "edge"}[temporal_padding]
  padded = xp.pad(x_hat, [(0, 0), (kt // 2, kt // 2), (0, 0), (0, 0), (0, 0)],
                  mode=mode)
  qkv_hat = p["temporal_conv"]["bias"] + sum(
      xp.einsum("bthwc,cd->bthwd", padded[:, i:i + t], kernel[i]) for i in range(kt))
  q_hat, k_hat = qkv_hat[..., :d], qkv_hat[..., d:2 * d]
  value = v if shared_value else qkv_hat[..., 2 * d:]
  # One T x T matrix per head, from the head's slice of channels.
  heads = lambda a: a.reshape(b, t, h, w, temporal_heads, d // temporal_heads)
  s_t = 1.0 if scale == "none" else (h * w * d // temporal_heads) ** -0.5
  if temporal_cosine_scale:  # cosine of each pair of frames, times a learned scale
    unit = lambda a: a / xp.sqrt(xp.sum(a ** 2, axis=(2, 3, 5), keepdims=True))
    scales = xp.minimum(xp.exp(p["temporal_log_scale"]), 100.0)
    logits_t = xp.einsum("bthwnc,bshwnc->bnts", unit(heads(q_hat)),
                         unit(heads(k_hat))) * scales[None, :, None, None]
  else:
    logits_t = xp.einsum("bthwnc,bshwnc->bnts", heads(q_hat), heads(k_hat)) * s_t
  if temporal_logit_cap:  # content logits bounded to (-cap, cap)
    logits_t = temporal_logit_cap * xp.tanh(logits_t / temporal_logit_cap)
  if temporal_bias:  # a learned (heads, T, T) matrix, the same for every clip
    logits_t = logits_t + p["global_logits"][None]
  if temporal_norm == "others-minus-self":  # a frame gives itself no weight
    logits_t = logits_t + np.where(np.eye(t, dtype=bool), -np.inf, 0.0)
  if temporal_norm == "earlier-minus-self":  # only the frames before it
    before = np.tril(np.ones((t, t), dtype=bool), k=-1)
    logits_t = xp.where(before, logits_t, -np.inf)
    logits_t = xp.where(np.arange(t)[:, None] == 0, 0.0, logits_t)  # row 0: none
  m_t = _softmax(logits_t, xp)
  if weights:
    return m_t
  if temporal_norm != "softmax":  # the blend minus the frame itself
    m_t = m_t - xp.eye(t)
  if temporal_norm == "earlier-minus-self":  # the first frame has no change
    m_t = m_t * (np.arange(t) > 0)[:, None]
  # Eq. 8: the temporal weights mix the (shared) value embedding.
  y = xp.einsum("bnts,bshwnc->bthwnc", m_t, heads(value)).reshape(b, t, h, w, d)
  if reduction > 1:
    y = dense(p["out"], y)
  if residual:  # BN with its initial statistics (mean 0, variance 1)
    y = x + y / np.sqrt(1.0 + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  return y


SWITCHES = [
    {},
    {"channel_branch": False},
    {"shared_value": False},
    {"temporal_kernel": 1},
    {"temporal_kernel": 5, "temporal_padding": "edge"},
    {"scale": "sqrt_d"},
    {"residual": True},
    {"residual": True, "reduction": 2, "gate_init": 1.0},
    {"reduction": 2},
    {"temporal_heads": 4},
    {"temporal_heads": 2, "reduction": 2, "shared_value": False, "residual": True},
    {"spatial_chunk": 3, "save_probs": False},  # 8 frames in chunks of 3: padded
    # std 1: a bias that moves the softmax visibly
    {"temporal_bias": True, "temporal_bias_init_std": 1.0, "temporal_heads": 4},
    {"temporal_bias": True, "temporal_bias_init_std": 1.0, "scale": "sqrt_d",
     "residual": True},
    {"temporal_norm": "softmax-identity"},
    {"temporal_norm": "softmax-identity", "temporal_heads": 2, "shared_value": False,
     "residual": True},
    {"temporal_norm": "others-minus-self", "temporal_heads": 4},
    {"temporal_norm": "others-minus-self", "temporal_bias": True,
     "temporal_bias_init_std": 1.0, "scale": "sqrt_d"},
    {"temporal_norm": "earlier-minus-self", "temporal_heads": 2},
    # cap 0.5: the unscaled logits here reach several units, so it binds
    {"temporal_norm": "softmax-identity", "temporal_logit_cap": 0.5},
    {"temporal_norm": "earlier-minus-self", "temporal_bias": True,
     "temporal_bias_init_std": 1.0, "scale": "sqrt_d", "residual": True},
    {"temporal_cosine_scale": 5.0, "temporal_heads": 4},
    {"temporal_cosine_scale": 150.0},  # above MAX_COSINE_SCALE: the bound binds
    {"temporal_cosine_scale": 2.0, "temporal_norm": "softmax-identity",
     "temporal_bias": True, "temporal_bias_init_std": 1.0, "residual": True},
]
switch_id = lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "paper"


def init_variables(module, x):
  """The module's variables, with random BN scales and shifts (a zero scale would
  hide the branch)."""
  variables = jax.jit(module.init)(jax.random.key(1), x)
  if "bn" in variables["params"]:
    variables["params"]["bn"] = {
        "scale": jax.random.normal(jax.random.key(2), (SHAPE[-1],)),
        "bias": jax.random.normal(jax.random.key(3), (SHAPE[-1],))}
  return variables


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_matches_einsum_reference(switches):
  x = 0.5 * jax.random.normal(jax.random.key(0), SHAPE)
  module = ssa.SeparableSelfAttention(**switches)
  variables = init_variables(module, x)
  out = jax.jit(module.apply)(variables, x)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, reference_ssa(variables["params"], x, **switches),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_sown_temporal_weights_match_reference(switches):
  """With `intermediates` mutable, the module sows `M_T` (what gta_jax.visualize
  draws), and only then."""
  x = 0.5 * jax.random.normal(jax.random.key(0), SHAPE)
  module = ssa.SeparableSelfAttention(**switches)
  variables = init_variables(module, x)
  out, state = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(
      variables, x)
  np.testing.assert_allclose(out, jax.jit(module.apply)(variables, x), rtol=1e-6,
                             atol=1e-6)
  (sown,) = state["intermediates"][ssa.WEIGHTS]
  np.testing.assert_allclose(
      sown, reference_ssa(variables["params"], x, weights=True, **switches),
      rtol=1e-4, atol=1e-5)
  _, state = module.apply(variables, x, mutable=["batch_stats"])
  assert "intermediates" not in state


def assert_gradients_match(module, switches, x):
  """`jax.grad` of the module (through `attention.attend`'s custom VJP) equals
  `jax.grad` of :func:`reference_ssa` in jnp, for every parameter and the input."""
  variables = init_variables(module, x)
  target = jax.random.normal(jax.random.key(4), SHAPE)
  loss = lambda out: jnp.sum((out - target) ** 2)
  got = jax.jit(jax.grad(lambda p, x: loss(module.apply({**variables, "params": p}, x)),
                         argnums=(0, 1)))(variables["params"], x)
  want = jax.jit(jax.grad(
      lambda p, x: loss(reference_ssa(p, x, xp=jnp, **switches)),
      argnums=(0, 1)))(variables["params"], x)
  gradient_checks.assert_gradients_close(got, want)


# Every switch is on in one of these, and both memory modes are covered.
GRADIENT_CASES = [
    {"scale": "sqrt_d", "spatial_chunk": 3, "save_probs": False},
    {"scale": "sqrt_d", "shared_value": False, "temporal_kernel": 5,
     "temporal_padding": "edge", "residual": True, "reduction": 2, "gate_init": 1.0,
     "temporal_norm": "others-minus-self"},
    {"scale": "sqrt_d", "channel_branch": False, "temporal_kernel": 1,
     "residual": True, "temporal_heads": 4, "temporal_bias": True,
     "temporal_bias_init_std": 1.0, "temporal_norm": "softmax-identity"},
    {"scale": "sqrt_d", "residual": True, "temporal_heads": 2,
     "temporal_norm": "earlier-minus-self"},
    {"residual": True, "temporal_norm": "softmax-identity", "temporal_logit_cap": 0.5},
    {"residual": True, "temporal_norm": "softmax-identity", "temporal_heads": 2,
     "temporal_cosine_scale": 5.0},
]


@pytest.mark.parametrize("switches", GRADIENT_CASES, ids=switch_id)
def test_gradient_matches_reference(switches):
  """The backward pass, chunked (softmax recomputed) or in one piece with the
  softmax kept, through `attend`'s own gradient, gives the reference's."""
  x = 0.5 * jax.random.normal(jax.random.key(0), SHAPE)
  assert_gradients_match(ssa.SeparableSelfAttention(**switches), switches, x)


def test_gradient_check_catches_a_broken_vjp(monkeypatch):
  """The gradient test can fail: with a planted bug in `attend`'s custom VJP (the
  key's gradient doubled; the forward pass is untouched), the query and key
  kernels' gradients no longer match."""
  real_attend = attention.attend

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def broken(q, k, v, scale):
    return real_attend(q, k, v, scale=scale)

  def fwd(q, k, v, scale):
    return jax.vjp(lambda *a: real_attend(*a, scale=scale), q, k, v)

  def bwd(scale, vjp, d_out):
    del scale
    dq, dk, dv = vjp(d_out)
    return dq, 2.0 * dk, dv

  broken.defvjp(fwd, bwd)
  monkeypatch.setattr(attention, "attend",
                      lambda q, k, v, scale=None, **kw: broken(q, k, v, scale))
  switches = GRADIENT_CASES[0]
  x = 0.5 * jax.random.normal(jax.random.key(0), SHAPE)
  with pytest.raises(AssertionError, match="query|key"):
    assert_gradients_match(ssa.SeparableSelfAttention(**switches), switches, x)


def test_residual_is_identity_at_init():
  x = jax.random.normal(jax.random.key(0), SHAPE)
  module = ssa.SeparableSelfAttention(residual=True)
  variables = jax.jit(module.init)(jax.random.key(1), x)
  np.testing.assert_array_equal(jax.jit(module.apply)(variables, x), x)


def test_one_by_one_temporal_conv_is_blind_to_frame_order():
  """With a 1x1x1 conv every step is per frame or permutation-equivariant over T,
  so reversing the clip reverses the output: TSN's consensus then cannot tell."""
  x = jax.random.normal(jax.random.key(0), SHAPE)
  for temporal_conv in (False, True):
    module = ssa.SeparableSelfAttention(temporal_kernel=3 if temporal_conv else 1)
    variables = jax.jit(module.init)(jax.random.key(1), x)
    apply = jax.jit(module.apply)
    gap = float(jnp.max(jnp.abs(apply(variables, x[:, ::-1])[:, ::-1]
                                - apply(variables, x))))
    assert (gap > 1e-2) if temporal_conv else (gap < 1e-5), (temporal_conv, gap)


def test_temporal_bias_sees_frame_order_without_the_temporal_conv():
  """With a 1x1x1 conv the module is blind to frame order (above); the learned
  T x T bias alone, a function of frame positions, makes it see order."""
  x = jax.random.normal(jax.random.key(0), SHAPE)
  module = ssa.SeparableSelfAttention(temporal_kernel=1, temporal_bias=True,
                                      temporal_bias_init_std=1.0)
  variables = jax.jit(module.init)(jax.random.key(1), x)
  assert variables["params"]["global_logits"].shape == (1, SHAPE[1], SHAPE[1])
  apply = jax.jit(module.apply)
  gap = float(jnp.max(jnp.abs(apply(variables, x[:, ::-1])[:, ::-1] - apply(variables, x))))
  assert gap > 1e-2, gap


def test_identity_bias_gives_each_frame_half_its_weight():
  """`temporal_bias_init='identity'`: the bias starts at `log T` on the diagonal, so
  with equal content logits a frame weighs itself T / (2T - 1), about a half."""
  t = SHAPE[1]
  module = ssa.SeparableSelfAttention(temporal_bias=True, temporal_bias_init="identity",
                                      temporal_bias_init_std=0.0, temporal_heads=2)
  bias = module.init(jax.random.key(1), jnp.zeros(SHAPE))["params"]["global_logits"]
  weights = jax.nn.softmax(bias, axis=-1)
  np.testing.assert_allclose(np.diagonal(weights, axis1=1, axis2=2), t / (2 * t - 1),
                             rtol=1e-6)


def test_temporal_bias_refuses_another_clip_length():
  """The (heads, T, T) bias is built for one T: another is refused by name."""
  module = ssa.SeparableSelfAttention(temporal_bias=True)
  variables = module.init(jax.random.key(1), jnp.zeros(SHAPE))
  longer = (*SHAPE[:1], SHAPE[1] + 2, *SHAPE[2:])
  with pytest.raises(ValueError, match=r"SeparableSelfAttention layer .*built for "
                     rf"T={SHAPE[1]} .* got T={SHAPE[1] + 2}"):
    module.apply(variables, jnp.zeros(longer))


def test_bad_config_names_the_key():
  config = config_lib.synthetic_config("ssa")
  config.model.ssa.scale = "sqrt"
  with pytest.raises(ValueError, match="config.model.ssa.scale"):
    build_model(config)
  config.model.ssa.scale = "none"
  config.model.ssa.reduction = 0
  with pytest.raises(ValueError, match="config.model.ssa.reduction"):
    build_model(config)
  config.model.ssa.reduction = 1
  config.model.ssa.spatial_chunk = -1
  with pytest.raises(ValueError, match="config.model.ssa.spatial_chunk"):
    build_model(config)
  config.model.ssa.spatial_chunk = 8
  config.model.ssa.save_probs = True  # every frame's softmax kept: chunks bound nothing
  with pytest.raises(ValueError, match="config.model.ssa.save_probs.*spatial_chunk=0"):
    build_model(config)
  config.model.ssa.spatial_chunk = 0
  for key, bad in (("temporal_kernel", 2), ("temporal_padding", "wrap"),
                   ("temporal_norm", "signed"), ("temporal_bias_init", "eye"),
                   ("temporal_heads", 0),
                   ("temporal_bias_init_std", -1.0), ("temporal_logit_cap", -1.0),
                   ("temporal_cosine_scale", -1.0)):
    good = config.model.ssa[key]
    config.model.ssa[key] = bad
    with pytest.raises(ValueError, match=f"config.model.ssa.{key}"):
      build_model(config)
    config.model.ssa[key] = good
  build_model(config)
  config.model.ssa.temporal_logit_cap = 2.0
  config.model.ssa.temporal_cosine_scale = 10.0
  with pytest.raises(ValueError, match="temporal_logit_cap.*temporal_cosine_scale"):
    build_model(config)
  config.model.ssa.temporal_logit_cap = 0.0
  build_model(config)
  with config.ignore_type():
    config.model.ssa.gate_init = "one"
  with pytest.raises(ValueError, match="config.model.ssa.gate_init"):
    build_model(config)


def test_cosine_logits_ignore_the_magnitude_of_q_and_k():
  """With `cosine_scale`, scaling any frame's q or k (here each by its own
  positive factor) leaves `M_T` and the output unchanged; the dot product's do
  change, which is what saturated SSA's M_T in training (docs/ssa.md)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (4, 6, 10)) for i in range(3))
  factors = jnp.exp(3.0 * jax.random.normal(jax.random.key(5), (2, 4, 6, 1)))
  attend = functools.partial(ssa.temporal_attention, scale="sqrt_d", save_probs=True)
  cosine = functools.partial(attend, cosine_scale=jnp.array([4.0, 8.0]))
  np.testing.assert_allclose(cosine(factors[0] * q, factors[1] * k, v),
                             cosine(q, k, v), rtol=1e-5, atol=1e-5)
  assert not np.allclose(attend(factors[0] * q, factors[1] * k, v), attend(q, k, v),
                         atol=1e-2)


def test_temporal_heads_that_do_not_divide_the_channels_are_refused():
  module = ssa.SeparableSelfAttention(temporal_heads=3)
  with pytest.raises(ValueError, match="temporal_heads 3 does not divide the 8"):
    module.init(jax.random.key(0), jnp.zeros(SHAPE))


@pytest.mark.parametrize("num_frames", [8, 16])
def test_r50_forward_backward_and_frame_order(num_frames):
  """SSA-R50 at the paper's places runs forward and backward (on 64px frames) and
  tells a clip from its reverse."""
  config = config_lib.ssv2_config(num_frames, "ssa")
  config.model.dropout_rate = 0.0
  model = build_model(config)
  clip = jax.random.normal(jax.random.key(0), (1, num_frames, 64, 64, 3))
  # A clip and its reverse in one batch: the training-mode batch statistics see the
  # same frames either way, so a model blind to frame order gives equal logits.
  clips = jnp.concatenate([clip, clip[:, ::-1]])

  @jax.jit
  def init_and_grad(key, clips):  # one compilation for both
    variables = model.init(key, clips, train=False)

    def loss(p):
      logits, _ = model.apply({**variables, "params": p}, clips, train=True,
                              mutable=["batch_stats"])
      return jax.nn.log_softmax(logits)[:, 0].sum(), logits

    return jax.grad(loss, has_aux=True)(variables["params"])

  grads, logits = init_and_grad(jax.random.key(1), clips)
  # The five modules sit inside res3 blocks 0, 2 and res4 blocks 0, 2, 4, with
  # 3 (C^2 + C) q/k/v and 3 C 2C + 2C temporal-conv parameters at width C.
  placed = {name: sum(a.size for a in jax.tree.leaves(block["inner"]))
            for name, block in grads.items() if "inner" in block}
  expected = {f"res{s}_block{i}": 3 * (c * c + c) + 6 * c * c + 2 * c
              for s, c, blocks in ((3, 128, (0, 2)), (4, 256, (0, 2, 4)))
              for i in blocks}
  assert placed == expected
  assert logits.shape == (2, 174)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["res3_block0"]["inner"]["query"]["kernel"]).max()) > 0
  gap = float(jnp.max(jnp.abs(logits[0] - logits[1])))
  assert gap > 1e-3 * float(jnp.max(jnp.abs(logits)))


def test_bfloat16_compute_follows_float32():
  """bf16 compute (f32 params, f32 logits and softmax inside `attend`) stays close
  to the f32 module."""
  x = jax.random.normal(jax.random.key(0), SHAPE)
  variables = jax.jit(ssa.SeparableSelfAttention(scale="sqrt_d").init)(
      jax.random.key(1), x)
  outs = {dtype: jax.jit(ssa.SeparableSelfAttention(scale="sqrt_d", dtype=dtype).apply)(
      variables, x) for dtype in (jnp.float32, jnp.bfloat16)}
  assert outs[jnp.bfloat16].dtype == jnp.bfloat16
  error = jnp.abs(outs[jnp.bfloat16].astype(jnp.float32) - outs[jnp.float32])
  assert float(error.max()) < 0.05 * float(jnp.abs(outs[jnp.float32]).max())
