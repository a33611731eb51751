"""GTA: each switch against a numpy re-derivation, and the block's properties."""

import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradient_checks

from gta_jax import config_lib
from gta_jax.models import attention
from gta_jax.models import backend
from gta_jax.models import gta
from gta_jax.models import registry

MODES = gta.TEMPORAL_ATTENTIONS
GRANULARITIES = gta.GRANULARITIES


def softmax(a, axis, xp=np):
  e = xp.exp(a - a.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def perturb(tree, seed, std=0.5):
  """Replaces every parameter by a random one; BN variances stay positive."""
  flat = flax.traverse_util.flatten_dict(tree)
  rng = np.random.default_rng(seed)
  out = {}
  for path, value in flat.items():
    noise = rng.normal(0.0, std, value.shape).astype(np.float32)
    out[path] = 0.5 + np.abs(noise) if path[-1] == "var" else noise
  return flax.traverse_util.unflatten_dict(out)


def head_matrix(kernel, cross_channel, xp=np):
  """The `(C, C)` matrix a HeadProjection kernel applies; head h owns output
  channels `[h*d, (h+1)*d)`. Split heads give a block-diagonal matrix."""
  if cross_channel:
    return kernel.reshape(kernel.shape[0], -1)
  n, d, _ = kernel.shape
  return xp.einsum("hg,hcd->hcgd", xp.eye(n), kernel).reshape(n * d, n * d)


def reference_temporal(tokens, p, sw, xp):
  """Head-wise attention over T of `(B, T, L, C)` tokens."""
  b, t, l, c = tokens.shape
  heads = sw["num_heads"]
  d = c // heads
  project = lambda a, n: a @ head_matrix(p[n]["kernel"], sw["cross_channel"], xp)
  v = project(tokens, "value").reshape(b, t, l, heads, d)
  logits = xp.zeros((b, heads, t, t))
  if "global" in sw["temporal_attention"]:
    logits = logits + p["global_logits"][None]
  if "instance" in sw["temporal_attention"]:
    pooled = tokens.mean(axis=2)  # (B, T, C)
    q = project(pooled, "query").reshape(b, t, heads, d)
    k = project(pooled, "key").reshape(b, t, heads, d)
    logits = logits + xp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  if sw["global_norm"] == "signed":
    attn = logits
  else:
    attn = softmax(logits, -1, xp)
    if sw["global_norm"] == "softmax-identity":
      attn = attn - xp.eye(t)
  return xp.einsum("bhts,bslhd->btlhd", attn, v).reshape(b, t, l, c)


DEFAULTS = dict(temporal_attention="global", granularity="both", temporal_input="s+v",
                global_norm="softmax-identity", region_norm=False, num_heads=2,
                cross_channel=True, pool_keys=False)  # the block's defaults


def pool_2x2(a, xp):
  """`(B, T, H, W, C)` -> `(B, T, (H // 2) * (W // 2), C)`: the maximum of each
  2x2 window; an odd last row or column is dropped."""
  b, t, h, w, c = a.shape
  a = a[:, :, :h // 2 * 2, :w // 2 * 2]
  a = a.reshape(b, t, h // 2, 2, w // 2, 2, c).max(axis=(3, 5))
  return a.reshape(b, t, -1, c)


def reference_gta(x, variables, train=False, xp=np, **switches):
  """The GTA block of docs/gta.md, written from its equations with einsums.

  `xp=np` runs it in float64 numpy; `xp=jnp` in float32 jax, for `jax.grad`
  (no custom VJP anywhere on that path).
  """
  sw = {**DEFAULTS, **switches}
  if xp is np:
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    x = np.asarray(x, np.float64)
  p, stats = variables["params"], variables["batch_stats"]
  b, t, h, w, c = x.shape
  pixels = x.reshape(b, t, h * w, c)
  inner = p["g"]["kernel"].shape[1]

  # Spatial attention within each frame (phi has no bias: softmax over keys).
  q = pixels @ p["theta"]["kernel"] + p["theta"]["bias"]
  k = pixels @ p["phi"]["kernel"]
  v = pixels @ p["g"]["kernel"] + p["g"]["bias"]
  keys, values = k, v
  if sw["pool_keys"]:  # the max of each whole 2x2 window of space
    keys, values = (pool_2x2(a.reshape(b, t, h, w, inner), xp) for a in (k, v))
  attn = softmax(xp.einsum("btpc,btqc->btpq", q, keys) / np.sqrt(inner), -1, xp)
  u = xp.einsum("btpq,btqc->btpc", attn, values)
  if sw["temporal_input"] == "s+v":
    u = u + v
  elif sw["temporal_input"] == "x+s":
    u = u + pixels @ p["skip"]["kernel"]

  y = 0.0
  if sw["granularity"] in ("pixel", "both"):
    y = y + reference_temporal(u, p["pixel_temporal"], sw, xp)
  if sw["granularity"] in ("region", "both"):
    assign = softmax(pixels @ p["region_logits"]["kernel"], 2, xp)  # over HW
    regions = reference_temporal(xp.einsum("btpk,btpc->btkc", assign, u),
                                 p["region_temporal"], sw, xp)
    back = assign / assign.sum(-1, keepdims=True) if sw["region_norm"] else assign
    y = y + xp.einsum("btpk,btkc->btpc", back, regions)

  z = y @ p["out"]["kernel"]
  mean, var = stats["bn"]["mean"], stats["bn"]["var"]
  if train:  # batch statistics over (B, T, H*W)
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
  z = (z - mean) / xp.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  return x + z.reshape(x.shape)


def random_block(shape=(2, 4, 4, 4, 16), seed=0, **kwargs):
  """A GTA block with every variable randomised, its input and variables."""
  block = gta.GlobalTemporalAttention(**{"num_heads": 2, "num_regions": 3, **kwargs})
  x = jax.random.normal(jax.random.PRNGKey(seed), shape)
  variables = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
  return block, x, {k: perturb(v, seed + 1) for k, v in variables.items()}


CASES = [dict(temporal_attention=m, granularity=g, cross_channel=cc)
         for m in MODES for g in GRANULARITIES for cc in (True, False)]
# Each new switch on, with both branches and the global matrix.
SWITCHES = [dict(temporal_input="s"), dict(temporal_input="x+s"),
            dict(global_norm="softmax"), dict(global_norm="signed"),
            dict(region_norm=True), dict(pool_keys=True),
            dict(temporal_attention="global+instance", global_norm="softmax",
                 temporal_input="s", region_norm=True, cross_channel=False)]
case_id = lambda sw: "-".join(f"{k}={v}" for k, v in sw.items())


@pytest.mark.parametrize("switches", CASES + SWITCHES, ids=case_id)
def test_block_matches_reference(switches):
  block, x, variables = random_block(**switches)
  got = block.apply(variables, x)
  want = reference_gta(x, variables, **switches)
  # float32 against the float64 reference, relative to the largest output: the BN
  # after the projection divides by a small standard deviation, so an absolute 1e-5
  # depends on the draw (measured over these cases: at most 6e-7 of max|want|).
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_region_norm_matches_a_loop_reference():
  """The region branch with the scatter-back normalised over K, in numpy loops over
  clips, frames, regions, heads and pixels (on `s`, with a row softmax over T)."""
  k_regions, heads = 5, 2
  block, x, variables = random_block(granularity="region", region_norm=True,
                                     num_regions=k_regions, num_heads=heads,
                                     temporal_input="s", global_norm="softmax")
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  bn = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])["bn"]
  xs = np.asarray(x, np.float64)
  b, t, h, w, c = xs.shape
  inner, d = c // 2, c // 2 // heads
  value_kernel = p["region_temporal"]["value"]["kernel"].reshape(inner, inner)
  attn = softmax(p["region_temporal"]["global_logits"], -1)  # (heads, T, T)
  y = np.zeros((b, t, h * w, inner))
  for i in range(b):
    s, m = [], []
    for f in range(t):
      pix = xs[i, f].reshape(h * w, c)
      q = pix @ p["theta"]["kernel"] + p["theta"]["bias"]
      k = pix @ p["phi"]["kernel"]
      v = pix @ p["g"]["kernel"] + p["g"]["bias"]
      s.append(softmax(q @ k.T / np.sqrt(inner), -1) @ v)
      m.append(softmax(pix @ p["region_logits"]["kernel"], 0))  # (HW, K), over HW
    values = np.array([[m[f][:, r] @ s[f] for r in range(k_regions)]
                       for f in range(t)]) @ value_kernel  # (T, K, C')
    for f in range(t):
      mixed = np.zeros((k_regions, inner))
      for head in range(heads):
        cols = slice(head * d, (head + 1) * d)
        for other in range(t):
          mixed[:, cols] += attn[head, f, other] * values[other, :, cols]
      for pixel in range(h * w):
        y[i, f, pixel] = (m[f][pixel] / m[f][pixel].sum()) @ mixed
  z = y @ p["out"]["kernel"]
  z = (z - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  np.testing.assert_allclose(block.apply(variables, x), xs + z.reshape(xs.shape),
                             atol=1e-5, rtol=1e-5)


def test_reduction_heads_and_regions_match_reference():
  block, x, variables = random_block(
      seed=3, temporal_attention="global+instance", num_heads=4, num_regions=5,
      reduction=4)
  assert variables["params"]["g"]["kernel"].shape == (16, 4)
  assert variables["params"]["region_logits"]["kernel"].shape == (16, 5)
  # The biases a softmax or the output BN would cancel are gone.
  assert set(variables["params"]["phi"]) == {"kernel"}
  assert set(variables["params"]["region_logits"]) == {"kernel"}
  assert set(variables["params"]["out"]) == {"kernel"}
  want = reference_gta(x, variables, temporal_attention="global+instance",
                       num_heads=4)
  np.testing.assert_allclose(block.apply(variables, x), want, atol=1e-5, rtol=1e-5)


def test_pooled_keys_on_an_odd_frame_match_reference():
  """5x5 frames: the keys are the 2x2 maxima of the top-left 4x4, every query kept."""
  block, x, variables = random_block(shape=(2, 4, 5, 5, 16), seed=8, pool_keys=True)
  want = reference_gta(x, variables, pool_keys=True)
  for cpu_kernels in (True, False):  # the XLA:CPU pooling kernel and flax's
    with backend.options(cpu_kernels=cpu_kernels):
      got = block.apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_reduction_must_divide_channels():
  block = gta.GlobalTemporalAttention(reduction=3)
  with pytest.raises(ValueError, match="reduction 3 does not divide the 16 channels"):
    jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4, 16)))


def test_train_mode_uses_batch_statistics():
  sw = dict(temporal_attention="global+instance", temporal_input="s+v")
  block, x, variables = random_block(seed=4, **sw)
  got, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
  want = reference_gta(x, variables, train=True, **sw)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def assert_gradients_match(block, x, variables, switches, train=False):
  """`jax.grad` of the block (through `attention.attend`'s custom VJP) equals
  `jax.grad` of :func:`reference_gta` in jnp, for every parameter and the input."""
  target = jax.random.normal(jax.random.PRNGKey(7), x.shape)

  def block_loss(params, x):
    out = block.apply({**variables, "params": params}, x, train=train,
                      mutable=["batch_stats"])[0]
    return jnp.sum((out - target) ** 2)

  def reference_loss(params, x):
    out = reference_gta(x, {**variables, "params": params}, train=train, xp=jnp,
                        **switches)
    return jnp.sum((out - target) ** 2)

  params = jax.tree.map(jnp.asarray, variables["params"])
  got = jax.jit(jax.grad(block_loss, argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(params, x)
  gradient_checks.assert_gradients_close(got, want)


# Every branch and every switch value in a few compiled cases.
GRADIENT_CASES = [
    dict(temporal_attention="instance", granularity="pixel", cross_channel=False),
    dict(temporal_input="x+s", global_norm="signed", granularity="region",
         pool_keys=True),
    SWITCHES[-1],  # global+instance, softmax, s, region_norm, grouped heads
]


@pytest.mark.parametrize("switches", GRADIENT_CASES, ids=case_id)
def test_gradients_match_reference(switches):
  """All branches and switches: the gradients of the parameters and the input."""
  block, x, variables = random_block(seed=5, **switches)
  assert_gradients_match(block, x, variables, switches)


def test_gradients_match_reference_in_train_mode():
  switches = dict(temporal_attention="global+instance", temporal_input="x+s",
                  region_norm=True)
  block, x, variables = random_block(seed=6, **switches)
  assert_gradients_match(block, x, variables, switches, train=True)


def test_gradient_check_catches_a_broken_vjp(monkeypatch):
  """The gradient test can fail: with a planted bug in the spatial attention's
  custom VJP (the query's gradient halved; the forward pass is untouched), it
  reports a mismatch in theta's gradient."""
  real_attend = attention.attend

  @jax.custom_vjp
  def broken(q, k, v):
    return real_attend(q, k, v)

  def fwd(q, k, v):
    out, vjp = jax.vjp(real_attend, q, k, v)
    return out, vjp

  def bwd(vjp, d_out):
    dq, dk, dv = vjp(d_out)
    return 0.5 * dq, dk, dv

  broken.defvjp(fwd, bwd)
  monkeypatch.setattr(attention, "attend", lambda q, k, v, **kw: broken(q, k, v))
  switches = dict(granularity="pixel")
  block, x, variables = random_block(seed=5, **switches)
  np.testing.assert_allclose(block.apply(variables, x),
                             reference_gta(x, variables, **switches),
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(AssertionError, match="theta"):
    assert_gradients_match(block, x, variables, switches)


def test_bfloat16_close_to_float32():
  block, x, variables = random_block(temporal_attention="global+instance")
  want = block.apply(variables, x)
  got = block.clone(dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  # Each of the 8 roundings to bf16 along the longest path (the q, k, v inputs,
  # the softmax weights, the spatial output, the head projection, the temporal
  # weights, the temporal mix, the out conv's input) adds at most eps relative to
  # the block's scale: |error| <= 8 eps max|out|. Measured 2.5-4.3 eps (seeds 0-2).
  error = jnp.abs(got.astype(jnp.float32) - want)
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  assert float(error.max()) <= 8 * eps * float(jnp.abs(want).max())


def test_other_clip_length_is_refused():
  block, _, variables = random_block((1, 4, 4, 4, 16), num_heads=2, num_regions=3)
  with pytest.raises(ValueError, match=r"pixel_temporal was built for T=4 .* got T=6"):
    block.apply(variables, jnp.zeros((1, 6, 4, 4, 16)))


def tiny_config(temporal_modules, num_frames=4, **gta_options):
  c = config_lib.synthetic_config(temporal_modules)
  c.data.num_frames = num_frames
  c.model.gta.num_heads = 4
  c.model.gta.update(gta_options)
  return c


def random_variables(model, x, seed=0):
  """Fan-in scaled random variables from the shapes alone (no init compile)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    if path[-1] in ("scale", "var"):
      return np.ones(shape.shape, np.float32)
    if path[-1] in ("bias", "mean"):
      return np.zeros(shape.shape, np.float32)
    fan_in = np.prod(shape.shape[:-1]) if path[-1] == "kernel" else 1
    return (rng.standard_normal(shape.shape) / np.sqrt(fan_in)).astype(np.float32)

  flat = flax.traverse_util.flatten_dict(shapes)
  return flax.traverse_util.unflatten_dict({p: fill(p, v) for p, v in flat.items()})



def drop_post(tree):
  return {k: ({n: m for n, m in v.items() if n != "post"} if isinstance(v, dict)
              else v) for k, v in tree.items()}


def test_identity_at_init():
  """At init a GTA model's logits are those of its backbone (same weights)."""
  config = tiny_config("gta", gate_init=0.0)
  model = registry.build_model(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 32, 3))
  variables = random_variables(model, x)  # a random backbone, then GTA at init
  block = gta.GTA_SPEC.build(config.model.gta, jnp.float32)()
  placed = [name for name, tree in variables["params"].items()
            if isinstance(tree, dict) and "post" in tree]
  assert placed == ["res4_block0"]  # the synthetic placement
  for name in placed:
    channels = variables["params"][name]["post"]["bn"]["scale"].shape[0]
    # An 'rbg' key compiles much faster than threefry on CPU.
    block_init = jax.jit(block.init)(jax.random.key(1, impl="rbg"),
                                     jnp.zeros((1, 4, 2, 2, channels)))
    for collection, value in block_init.items():
      variables[collection][name]["post"] = value
  backbone_variables = {k: drop_post(v) for k, v in variables.items()}
  backbone = registry.build_model(tiny_config(""))
  got = jax.jit(model.apply)(variables, x)
  want = jax.jit(backbone.apply)(backbone_variables, x)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode,order_sensitive",
                         [("global", True), ("instance", False)])
def test_frame_order(mode, order_sensitive):
  """A TSN backbone cannot see order; GTA's global matrix can, q.k cannot."""
  model = registry.build_model(tiny_config("gta", temporal_attention=mode))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 32, 3))
  clips = jnp.concatenate([x, x[:, ::-1]])  # eval mode: samples are independent
  variables = random_variables(model, clips)  # random G, non-zero BN scales
  logits, reversed_logits = jnp.split(jax.jit(model.apply)(variables, clips), 2)
  gap = float(jnp.max(jnp.abs(logits - reversed_logits)))
  scale = float(jnp.max(jnp.abs(logits)))
  if order_sensitive:
    assert gap > 1e-3 * scale
  else:
    assert gap <= 1e-5 * max(scale, 1.0)


@pytest.mark.parametrize("global_norm", gta.GLOBAL_NORMS)
def test_global_attention_maps(global_norm):
  x = jnp.zeros((1, 4, 32, 32, 3))
  config = tiny_config("gta", global_norm=global_norm, placement="res4:0;res5:0")
  variables = random_variables(registry.build_model(config), x)
  maps = gta.global_attention_maps(variables, global_norm)
  assert set(maps) == {f"res{s}_block0/post/{b}_temporal"
                       for s in (4, 5) for b in ("pixel", "region")}
  for path, attn in maps.items():
    stage, _, branch = path.split("/")
    logits = np.asarray(variables["params"][stage]["post"][branch]["global_logits"],
                        np.float64)
    want = {"softmax": softmax(logits, -1),
            "softmax-identity": softmax(logits, -1) - np.eye(4),
            "signed": logits}[global_norm]
    assert attn.shape == (4, 4, 4)
    np.testing.assert_allclose(attn, want, atol=1e-6)
  instance = registry.build_model(tiny_config("gta", temporal_attention="instance"))
  assert not gta.global_attention_maps(random_variables(instance, x))


@pytest.mark.parametrize("std", [0.0, 1.5])
def test_global_init_std_sets_the_spread_of_g(std):
  """`config.model.gta.global_init_std` is the std of every G's normal init (0: uniform
  attention at init)."""
  config = tiny_config("gta", global_init_std=std)
  block = gta.GTA_SPEC.build(config.model.gta, jnp.float32)()
  variables = jax.jit(block.init)(jax.random.key(0, impl="rbg"),
                                  jnp.zeros((1, 8, 2, 2, 64)))
  flat = flax.traverse_util.flatten_dict(variables["params"])
  g = np.concatenate([np.ravel(v) for k, v in flat.items() if k[-1] == "global_logits"])
  assert g.size == 2 * 4 * 8 * 8  # 2 branches x (4 heads, 8, 8)
  if std == 0:
    np.testing.assert_array_equal(g, 0)
  else:
    assert 0.85 * std < g.std() < 1.15 * std, g.std()


@pytest.mark.parametrize("global_norm,diagonal", [("softmax", np.log(8)),
                                                  ("signed", 1.0)])
def test_identity_init_biases_the_diagonal(global_norm, diagonal):
  """`global_init='identity'`: G is the random init plus a diagonal, log T on
  softmax logits (the frame itself takes about half its row), 1 when signed."""
  config = tiny_config("gta", global_init="identity", global_init_std=0.0,
                       global_norm=global_norm)
  block = gta.GTA_SPEC.build(config.model.gta, jnp.float32)()
  variables = jax.jit(block.init)(jax.random.key(0, impl="rbg"),
                                  jnp.zeros((1, 8, 2, 2, 64)))
  g = variables["params"]["pixel_temporal"]["global_logits"]
  np.testing.assert_allclose(g, np.broadcast_to(diagonal * np.eye(8), (4, 8, 8)),
                             rtol=1e-6)


@pytest.mark.parametrize("gate_init", [0.0, 1.0])
def test_gate_init_is_the_initial_bn_scale(gate_init):
  block = gta.GTA_SPEC.build(tiny_config("gta", gate_init=gate_init).model.gta,
                             jnp.float32)()
  variables = jax.jit(block.init)(jax.random.key(0, impl="rbg"),
                                  jnp.zeros((1, 8, 2, 2, 64)))
  np.testing.assert_array_equal(variables["params"]["bn"]["scale"],
                                np.full(64, gate_init, np.float32))


@pytest.mark.parametrize("key,value,match", [
    ("temporal_attention", "local", "config.model.gta.temporal_attention"),
    ("temporal_input", "x", "config.model.gta.temporal_input"),
    ("global_norm", "l1", "config.model.gta.global_norm"),
    ("global_init", "zeros", "config.model.gta.global_init"),
    ("gate_init", "one", "config.model.gta.gate_init"),
    ("region_norm", 1, "config.model.gta.region_norm"),
    ("granularity", "frame", "config.model.gta.granularity"),
    ("num_regions", 0, "config.model.gta.num_regions"),
    ("global_init_std", -0.1, "config.model.gta.global_init_std"),
    ("pool_keys", "yes", "config.model.gta.pool_keys"),
])
def test_bad_config_is_refused(key, value, match):
  config = tiny_config("gta")
  with config.unlocked(), config.ignore_type():
    config.model.gta[key] = value
  with pytest.raises(ValueError, match=match):
    registry.build_model(config)


def test_signed_matrix_needs_the_global_mode():
  with pytest.raises(ValueError, match="global_norm='signed'.*temporal_attention"):
    registry.build_model(tiny_config("gta", global_norm="signed",
                                     temporal_attention="global+instance"))


def test_heads_must_divide_channels():
  model = registry.build_model(tiny_config("gta", num_heads=3))
  with pytest.raises(ValueError, match="num_heads"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)))


@pytest.mark.parametrize("recipe", ["ssv2_gta_r50_8f", "k400_gta_i3d_r50_8x8"])
def test_r50_forward_backward(recipe):
  """The recipes' models run forward and backward (BN on running statistics, to
  keep the compile short; the block's train mode is tested above): finite
  gradients reach every GTA matrix."""
  config = importlib.import_module(recipe).get_config()
  assert config.model.temporal_modules == "gta"
  model = registry.build_model(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 64, 64, 3))
  variables = random_variables(model, x)

  def loss_fn(params):
    logits = model.apply({**variables, "params": params}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits

  grads, logits = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
  assert logits.shape == (1, config.model.num_classes)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # 5 blocks x (pixel, region), each with T=8 at its stage (no temporal stride).
  maps = gta.global_attention_maps(variables)
  assert len(maps) == 10
  for path in maps:
    stage, _, branch = path.split("/")
    g = grads[stage]["post"][branch]["global_logits"]
    assert g.shape == (8, 8, 8)
    assert float(jnp.abs(g).max()) > 0
