"""The jitted train/eval steps against a linear model whose gradient is known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gta_jax.training import sharding
from gta_jax.training import state as state_lib
from gta_jax.training import steps

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
K = 4


class PooledLinear(nn.Module):
  """logits = mean over (T, H, W) of the clip, then a dense layer."""

  @nn.compact
  def __call__(self, video, train=False):
    return nn.Dense(K, name="fc")(jnp.mean(video, axis=(1, 2, 3)))


def features(video_uint8):
  return ((video_uint8.astype(np.float64) - MEAN) / STD).mean(axis=(1, 2, 3))


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def make_state(tx):
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": rng.normal(size=(3, K)).astype(np.float32),
                   "bias": rng.normal(size=K).astype(np.float32)}}
  return state_lib.create_train_state({"params": params, "batch_stats": {}}, tx), params


def batch(b=6, seed=1):
  rng = np.random.default_rng(seed)
  return {"video": rng.integers(0, 256, (b, 2, 4, 4, 3), dtype=np.uint8),
          "label": rng.integers(0, K, b).astype(np.int32)}


@pytest.mark.parametrize("smoothing,lr_scale", [(0.0, 1.0), (0.2, 0.5)])
def test_train_step_is_one_sgd_step_on_the_cross_entropy(smoothing, lr_scale):
  lr = 0.3
  tx = optax.sgd(lr)
  state, params = make_state(tx)
  state = state.replace(lr_scale=jnp.float32(lr_scale))
  data = batch()
  step = steps.make_train_step(PooledLinear(), tx, learning_rate_fn=lambda s: lr,
                               label_smoothing=smoothing)
  new_state, metrics = step(state, data)

  x = features(data["video"])
  w, b = params["fc"]["kernel"], params["fc"]["bias"]
  p = softmax(x @ w + b)
  target = np.eye(K)[data["label"]] * (1 - smoothing) + smoothing / K
  loss = np.mean(-np.sum(target * np.log(p), axis=1))
  grad_w = x.T @ (p - target) / len(x)
  grad_b = np.mean(p - target, axis=0)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["lr"], lr * lr_scale, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"],
                             np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2)), rtol=1e-5)
  np.testing.assert_allclose(new_state.params["fc"]["kernel"],
                             w - lr * lr_scale * grad_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.params["fc"]["bias"],
                             b - lr * lr_scale * grad_b, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["accuracy"],
                             np.mean(np.argmax(x @ w + b, 1) == data["label"]))


def test_train_step_on_a_mesh_matches_plain_jit():
  tx = optax.sgd(0.1, momentum=0.9)
  data = batch(b=4)
  results = []
  for mesh in (None, sharding.make_mesh()):
    state, _ = make_state(tx)
    step = steps.make_train_step(PooledLinear(), tx, mesh=mesh)
    if mesh is not None:
      state = sharding.replicate(jax.device_get(state), mesh)
      data = sharding.shard_batch(data, mesh)
    for _ in range(2):
      state, metrics = step(state, data)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eval_step_averages_the_softmax_over_views():
  _, params = make_state(optax.sgd(0.1))
  rng = np.random.default_rng(2)
  b, v = 3, 5
  video = rng.integers(0, 256, (b, v, 2, 4, 4, 3), dtype=np.uint8)
  data = {"video": video, "label": np.arange(b, dtype=np.int32),
          "mask": np.array([True, True, False]), "video_index": np.arange(b, dtype=np.int32)}
  out = steps.make_eval_step(PooledLinear())({"params": params}, data)
  w, bias = params["fc"]["kernel"], params["fc"]["bias"]
  want = np.stack([softmax(features(video[:, i]) @ w + bias) for i in range(v)]).mean(0)
  np.testing.assert_allclose(out["probs"], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out["mask"], data["mask"])
  # Averaging probabilities is not averaging logits: the views must differ.
  logit_mean = softmax(np.mean([features(video[:, i]) @ w + bias for i in range(v)], 0))
  assert not np.allclose(logit_mean, want, atol=1e-4)
