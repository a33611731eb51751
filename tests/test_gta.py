"""GTA: each switch against a numpy re-derivation, and the block's properties."""

import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax.models import gta
from gta_jax.models import registry

MODES = gta.TEMPORAL_ATTENTIONS
GRANULARITIES = gta.GRANULARITIES


def softmax(a, axis):
  e = np.exp(a - a.max(axis=axis, keepdims=True))
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


def head_matrix(kernel, cross_channel):
  """The `(C, C)` matrix a HeadProjection kernel applies; head h owns output
  channels `[h*d, (h+1)*d)`. Split heads give a block-diagonal matrix."""
  kernel = np.asarray(kernel, np.float64)
  if cross_channel:
    return kernel.reshape(kernel.shape[0], -1)
  n, d, _ = kernel.shape
  w = np.zeros((n * d, n * d))
  for h in range(n):
    w[h * d:(h + 1) * d, h * d:(h + 1) * d] = kernel[h]
  return w


def reference_temporal(tokens, p, mode, heads, cross_channel):
  """Head-wise attention over T of `(B, T, L, C)`, one clip and head at a time."""
  b, t, l, c = tokens.shape
  d = c // heads
  v = tokens @ head_matrix(p["value"]["kernel"], cross_channel)
  out = np.zeros_like(v)
  for i in range(b):
    pooled = tokens[i].mean(axis=1)  # (T, C)
    for h in range(heads):
      hs = slice(h * d, (h + 1) * d)
      logits = np.zeros((t, t))
      if "global" in mode:
        logits += np.asarray(p["global_logits"][h], np.float64)
      if "instance" in mode:
        q = (pooled @ head_matrix(p["query"]["kernel"], cross_channel))[:, hs]
        k = (pooled @ head_matrix(p["key"]["kernel"], cross_channel))[:, hs]
        logits += q @ k.T / np.sqrt(d)
      attn = softmax(logits, axis=-1)
      for s in range(t):
        out[i, :, :, hs] += attn[:, s, None, None] * v[i, s, :, hs][None]
  return out


def reference_gta(x, variables, mode, granularity, heads, cross_channel,
                  train=False):
  """The GTA block of DESIGN.md in float64 numpy, frame by frame."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  x = np.asarray(x, np.float64)
  b, t, h, w, c = x.shape
  pixels = x.reshape(b, t, h * w, c)
  dense = lambda y, q: y @ q["kernel"] + q["bias"]
  inner = p["g"]["kernel"].shape[1]

  s = np.zeros((b, t, h * w, inner))
  for i in range(b):
    for f in range(t):
      q, k, v = (dense(pixels[i, f], p[n]) for n in ("theta", "phi", "g"))
      s[i, f] = softmax(q @ k.T / np.sqrt(inner), axis=-1) @ v

  y = np.zeros_like(s)
  if granularity in ("pixel", "both"):
    y += reference_temporal(s, p["pixel_temporal"], mode, heads, cross_channel)
  if granularity in ("region", "both"):
    assign = softmax(dense(pixels, p["region_logits"]), axis=2)  # over HW
    regions = np.einsum("btpk,btpc->btkc", assign, s)
    regions = reference_temporal(regions, p["region_temporal"], mode, heads,
                                 cross_channel)
    y += np.einsum("btpk,btkc->btpc", assign, regions)

  z = dense(y, p["out"])
  mean, var = stats["bn"]["mean"], stats["bn"]["var"]
  if train:  # batch statistics over (B, T, H*W)
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
  z = (z - mean) / np.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  return x + z.reshape(x.shape)


def random_block(shape=(2, 4, 4, 4, 16), seed=0, **kwargs):
  """A GTA block with every variable randomised, its input and variables."""
  block = gta.GlobalTemporalAttention(**kwargs)
  x = jax.random.normal(jax.random.PRNGKey(seed), shape)
  variables = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
  return block, x, {k: perturb(v, seed + 1) for k, v in variables.items()}


CASES = [(m, g, cc) for m in MODES for g in GRANULARITIES for cc in (True, False)]


@pytest.mark.parametrize("mode,granularity,cross_channel", CASES)
def test_block_matches_reference(mode, granularity, cross_channel):
  block, x, variables = random_block(
      temporal_attention=mode, granularity=granularity, num_heads=2,
      num_regions=3, cross_channel=cross_channel)
  got = block.apply(variables, x)
  want = reference_gta(x, variables, mode, granularity, 2, cross_channel)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_reduction_heads_and_regions_match_reference():
  block, x, variables = random_block(
      seed=3, temporal_attention="global+instance", num_heads=4, num_regions=5,
      reduction=4)
  assert variables["params"]["g"]["kernel"].shape == (16, 4)
  assert variables["params"]["region_logits"]["kernel"].shape == (16, 5)
  want = reference_gta(x, variables, "global+instance", "both", 4, True)
  np.testing.assert_allclose(block.apply(variables, x), want, atol=1e-5, rtol=1e-5)


def test_train_mode_uses_batch_statistics():
  block, x, variables = random_block(seed=4, temporal_attention="global+instance")
  got, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
  want = reference_gta(x, variables, "global+instance", "both", 8, True, train=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
  block, x, variables = random_block(temporal_attention="global+instance")
  want = block.apply(variables, x)
  got = block.clone(dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.1, rtol=0.05)


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
  config = tiny_config("gta")
  model = registry.build_model(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 32, 3))
  variables = random_variables(model, x)  # a random backbone, then GTA at init
  block = gta.GTA_SPEC.build(config.model.gta, jnp.float32)()
  for name in ("res4_block0", "res5_block0"):
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


def test_global_attention_maps():
  x = jnp.zeros((1, 4, 32, 32, 3))
  variables = random_variables(registry.build_model(tiny_config("gta")), x)
  maps = gta.global_attention_maps(variables)
  assert set(maps) == {f"res{s}_block0/post/{b}_temporal"
                       for s in (4, 5) for b in ("pixel", "region")}
  for path, attn in maps.items():
    stage, _, branch = path.split("/")
    logits = np.asarray(variables["params"][stage]["post"][branch]["global_logits"])
    assert attn.shape == (4, 4, 4)
    np.testing.assert_allclose(attn, softmax(logits.astype(np.float64), -1),
                               atol=1e-6)
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


@pytest.mark.parametrize("key,value,match", [
    ("temporal_attention", "local", "config.model.gta.temporal_attention"),
    ("granularity", "frame", "config.model.gta.granularity"),
    ("num_regions", 0, "config.model.gta.num_regions"),
    ("global_init_std", -0.1, "config.model.gta.global_init_std"),
])
def test_bad_config_is_refused(key, value, match):
  with pytest.raises(ValueError, match=match):
    registry.build_model(tiny_config("gta", **{key: value}))


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
