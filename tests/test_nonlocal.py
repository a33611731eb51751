"""Tests of the Non-local block: the released block (sub-sampled keys and values,
scaling) and the temporal position encoding, against a float64 numpy re-derivation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gta_jax import config_lib
from gta_jax.models import baselines
from gta_jax.models import build_model
from gta_jax.training import finetune


def perturb(variables, std=0.3, seed=1):
  """Random values for every parameter (the zero-initialised output BN scale
  included) and running statistics, so the block is active."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  variables = jax.tree.unflatten(treedef, noisy)
  # Running variances stay positive.
  variables["batch_stats"] = jax.tree.map(lambda v: jnp.abs(v) + 0.5,
                                          variables["batch_stats"])
  return variables


def max_pool_2x2(v):
  """2x2 max-pooling of `(B, T, H, W, C)` over H, W; an odd size drops its last
  row or column (PyTorch's `MaxPool3d((1, 2, 2))`)."""
  b, t, h, w, c = v.shape
  v = v[:, :, :h // 2 * 2, :w // 2 * 2]
  return v.reshape(b, t, h // 2, 2, w // 2, 2, c).max(axis=(3, 5))


def sinusoidal_numpy(length, channels):
  table = np.zeros((length, channels))
  for t in range(length):
    for i in range(channels):
      angle = t / 10000 ** (2 * (i // 2) / channels)
      table[t, i] = np.sin(angle) if i % 2 == 0 else np.cos(angle)
  return table


def nonlocal_reference(params, stats, x, kind, scaled, sub_sample=False, position=None):
  """The embedded-Gaussian Non-local block in float64 numpy, from the paper's
  equation and mmcv's sub-sampling (max-pooled phi(x) and g(x))."""
  x = np.asarray(x, np.float64)
  b, t, h, w, c = x.shape
  # phi and out have no bias: the softmax over keys and the output BN cancel it.
  proj = lambda p, v: v @ np.asarray(p["kernel"]) + np.asarray(p.get("bias", 0.0))
  x_qk = x if position is None else x + np.asarray(position)[None, :, None, None, :]
  theta, phi, g = proj(params["theta"], x_qk), proj(params["phi"], x_qk), proj(params["g"], x)
  if sub_sample:
    phi, g = max_pool_2x2(phi), max_pool_2x2(g)
  ci = theta.shape[-1]
  if kind == "3d":
    groups = lambda v: v.reshape(b, -1, ci)
  elif kind == "2d":
    groups = lambda v: v.reshape(b * t, -1, ci)
  else:
    groups = lambda v: np.moveaxis(v, 1, 3).reshape(b * h * w, t, ci)
  q, k, v = groups(theta), groups(phi), groups(g)
  logits = np.einsum("nid,njd->nij", q, k) / (np.sqrt(ci) if scaled else 1.0)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum("nij,njd->nid", weights, v)
  if kind == "1d":
    y = np.moveaxis(y.reshape(b, h, w, t, ci), 3, 1)
  y = proj(params["out"], y.reshape(b, t, h, w, ci))
  bn = params["bn"]
  y = (y - np.asarray(stats["bn"]["mean"])) / np.sqrt(np.asarray(stats["bn"]["var"]) + 1e-5)
  return x + y * np.asarray(bn["scale"]) + np.asarray(bn["bias"])


def init_perturbed(module, x):
  return perturb(module.init(jax.random.key(1), x))


# (2, 4, 5, 7, 8): odd H and W, so sub-sampling drops a row and a column of keys.
CLIP = functools.partial(jax.random.normal, jax.random.key(0), (2, 4, 5, 7, 8))


@pytest.mark.parametrize("kind", ["3d", "2d", "1d"])
@pytest.mark.parametrize("train", [False, True])
def test_zero_initialised_nonlocal_is_identity(kind, train):
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 6, 16))
  module = baselines.NonLocal(kind)
  variables = module.init(jax.random.key(1), x)
  y, _ = module.apply(variables, x, train=train, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("kind,scaled,sub_sample", [
    ("3d", False, True), ("3d", True, True), ("3d", False, False), ("3d", True, False),
    ("2d", False, True), ("2d", True, False), ("1d", False, False), ("1d", True, False)])
def test_nonlocal_matches_numpy_reference(kind, scaled, sub_sample):
  x = 0.5 * CLIP()
  module = baselines.NonLocal(kind, scaled=scaled, sub_sample=sub_sample)
  variables = init_perturbed(module, x)
  y = module.apply(variables, x, train=False)
  expected = nonlocal_reference(variables["params"], variables["batch_stats"], x, kind,
                                scaled, sub_sample)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_sub_sampling_changes_the_block_and_spares_a_temporal_block():
  x = 0.5 * CLIP()
  pooled, full = (baselines.NonLocal("3d", sub_sample=s) for s in (True, False))
  variables = init_perturbed(pooled, x)
  gap = np.abs(np.asarray(pooled.apply(variables, x) - full.apply(variables, x))).max()
  assert gap > 1e-2
  # A 1d block's keys are a pixel's frames: nothing spatial to pool.
  temporal = [baselines.NonLocal("1d", sub_sample=s) for s in (True, False)]
  np.testing.assert_array_equal(temporal[0].apply(variables, x),
                                temporal[1].apply(variables, x))


def test_2d1d_sub_samples_its_spatial_block_and_positions_its_temporal_one():
  x = 0.5 * CLIP()
  module = baselines.NonLocal2D1D(temporal_position="sinusoidal")
  variables = init_perturbed(module, x)
  part = lambda tree, name: tree[f"nonlocal_{name}"]
  params, stats = variables["params"], variables["batch_stats"]
  spatial = nonlocal_reference(part(params, "2d"), part(stats, "2d"), x, "2d", False,
                               sub_sample=True)
  expected = nonlocal_reference(part(params, "1d"), part(stats, "1d"), spatial, "1d",
                                False, position=sinusoidal_numpy(4, 8))
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_sinusoidal_table_matches_numpy():
  for length, channels in ((8, 16), (5, 7)):
    np.testing.assert_allclose(baselines.sinusoidal_table(length, channels),
                               sinusoidal_numpy(length, channels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_temporal_position_matches_numpy_reference(position):
  x = 0.5 * CLIP()
  module = baselines.NonLocal("3d", temporal_position=position)
  variables = init_perturbed(module, x)
  table = (variables["params"]["temporal_position"] if position == "learned"
           else sinusoidal_numpy(4, 8))
  expected = nonlocal_reference(variables["params"], variables["batch_stats"], x, "3d",
                                False, sub_sample=True, position=table)
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["3d", "1d"])
@pytest.mark.parametrize("position", ["none", "learned", "sinusoidal"])
def test_only_a_temporal_position_breaks_time_reversal_equivariance(kind, position):
  x = CLIP()
  module = baselines.NonLocal(kind, temporal_position=position)
  variables = init_perturbed(module, x)
  reversed_output = module.apply(variables, x[:, ::-1])
  output_reversed = module.apply(variables, x)[:, ::-1]
  gap = float(np.abs(np.asarray(reversed_output - output_reversed)).max())
  if position == "none":
    assert gap < 1e-5
  else:
    assert gap > 1e-2


def nonlocal_variables(position):
  config = config_lib.synthetic_config("nl")
  config.data.num_frames = 4
  config.model.nl.temporal_position = position
  model = build_model(config)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 4, 32, 32, 3)))
  return traverse_util.flatten_dict(shapes, sep="/")


def test_checkpoints_without_a_position_table_still_load():
  plain = nonlocal_variables("none")
  saved = {path: np.zeros(v.shape, v.dtype) for path, v in plain.items()}
  # The default and the sinusoidal table add no variables: the same checkpoint.
  for position in ("none", "sinusoidal"):
    _, report, problems = finetune.merge(nonlocal_variables(position), saved)
    assert not problems and len(report.loaded) == len(plain)
  # A learned table adds one (T, C) parameter per block, which init_reinit names.
  learned = nonlocal_variables("learned")
  tables = {p: v.shape for p, v in learned.items() if p.endswith("/temporal_position")}
  assert tables == {"params/res3_block0/post/temporal_position": (4, 64),
                    "params/res4_block0/post/temporal_position": (4, 128)}
  assert set(learned) - set(tables) == set(plain)
  _, report, problems = finetune.merge(learned, saved, reinit="temporal_position")
  assert not problems and sorted(report.reinitialised) == sorted(tables)


@pytest.mark.parametrize("key,value,message", [
    ("temporal_position", "rope", "config.model.nl.temporal_position must be one of"),
    ("sub_sample", None, "config.model.nl.sub_sample must be True or False"),
])
def test_bad_nonlocal_keys_are_named(key, value, message):
  config = config_lib.synthetic_config("nl")
  config.model.nl[key] = value
  with pytest.raises(ValueError, match=message):
    build_model(config)


def test_a_position_for_a_spatial_block_is_refused():
  config = config_lib.synthetic_config("nl")
  config.model.nl.kind = "2d"
  config.model.nl.temporal_position = "learned"
  with pytest.raises(ValueError, match="needs keys from several frames"):
    build_model(config)
