"""Optimizers and schedules against numpy re-derivations of their formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gta_jax import config_lib
from gta_jax.training import optim
from gta_jax.training import state as state_lib


def make_config(**optim_overrides):
  c = config_lib.base_config()
  c.total_steps, c.batch_size = 100, 32
  c.optim.base_lr, c.optim.lr_batch_size = 0.1, 64  # peak lr 0.05
  c.optim.warmup_steps = 10
  for k, v in optim_overrides.items():
    c.optim[k] = v
  return c


def test_cosine_schedule_with_warmup():
  schedule = optim.learning_rate_schedule(make_config(schedule="cosine"))
  peak = 0.1 * 32 / 64
  for s in (0, 5, 10, 40, 99):
    if s < 10:
      want = peak * s / 10
    else:
      want = peak * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
    assert float(schedule(s)) == pytest.approx(want, rel=1e-5, abs=1e-8)


def test_step_schedule_drops_at_the_boundaries():
  c = make_config(schedule="step", step_boundaries=(0.5, 0.75), step_factor=0.1)
  schedule = optim.learning_rate_schedule(c)
  peak = 0.05
  want = {9: peak * 0.9, 10: peak, 49: peak, 50: peak * 0.1, 74: peak * 0.1,
          75: peak * 0.01, 99: peak * 0.01}
  for s, lr in want.items():
    assert float(schedule(s)) == pytest.approx(lr, rel=1e-5), s


def test_plateau_scale_drops_after_patience():
  c = make_config(schedule="plateau", plateau_patience=2, plateau_factor=0.5)
  state = state_lib.create_train_state(
      {"params": {"w": jnp.zeros(2)}, "batch_stats": {}}, optax.sgd(0.1))
  history = []
  for top1 in (0.3, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6):
    scale, best, count = state_lib.update_plateau(state, top1, c)
    state = state.replace(lr_scale=jnp.float32(scale), plateau_best=jnp.float32(best),
                          plateau_count=jnp.int32(count))
    history.append(scale)
  # Two validations without improvement (0.5, 0.4) halve it, then 0.6 improves and
  # two more without improvement halve it again.
  assert history == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def toy_params():
  rng = np.random.default_rng(0)
  return {
      "stem_conv": {"conv": {"kernel": rng.normal(size=(3, 3)).astype(np.float32)}},
      "stem_bn": {"scale": rng.normal(size=3).astype(np.float32),
                  "bias": rng.normal(size=3).astype(np.float32)},
      "head": {"fc": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                      "bias": rng.normal(size=2).astype(np.float32)}},
      "res2_block0": {"conv1": {"conv": {"kernel": rng.normal(size=(2, 3)).astype(np.float32)}}},
      "res3_block0": {"post": {"pixel_temporal": {
          "global_logits": rng.normal(size=(2, 4, 4)).astype(np.float32)}}},
  }


def toy_grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (3 * rng.normal(size=p.shape)).astype(np.float32),
                      toy_params())


def is_kernel(path):
  return path[-1].key == "kernel"


def is_fc(path):
  return path[0].key == "head"


def is_global_logits(path):
  return path[-1].key == "global_logits"


def is_frozen(path, freeze):
  return bool(freeze) and "/".join(k.key for k in path).startswith("stem_")


@pytest.mark.parametrize("nesterov,freeze,backbone", [(False, "", 1.0), (True, "", 1.0),
                                                      (False, "^stem_", 0.1)])
def test_sgd_matches_pytorch_semantics(nesterov, freeze, backbone):
  """Clip, then decay on kernels only, momentum, lr, fc and G x mult (torch.optim.SGD);
  fine-tuning: frozen parameters (stem_*) left out of the clipping norm and fixed,
  the rest of the ResNet at `backbone` x the rate."""
  c = make_config(schedule="cosine", warmup_steps=0, name="sgd", momentum=0.9,
                  nesterov=nesterov, weight_decay=0.01, grad_clip_norm=2.0, fc_lr_mult=5.0,
                  global_logits_lr_mult=3.0, freeze=freeze, backbone_lr_mult=backbone)
  params = toy_params()
  tx = optim.make_optimizer(c, params)
  opt_state = tx.init(params)
  ref_params = jax.tree.map(np.array, params)
  buf = jax.tree.map(np.zeros_like, params)
  schedule = optim.learning_rate_schedule(c)
  p = params
  for t in range(3):
    g = toy_grads(t)
    updates, opt_state = tx.update(g, opt_state, p)
    p = optax.apply_updates(p, updates)
    # Reference.
    norm = math.sqrt(sum(float(np.sum(x**2)) for path, x in
                         jax.tree_util.tree_leaves_with_path(g) if not is_frozen(path, freeze)))
    clip = min(1.0, 2.0 / norm)
    lr = float(schedule(t))

    def ref(path, w, gr, b):
      if is_frozen(path, freeze):
        return w
      gr = gr * clip + (0.01 * w if is_kernel(path) else 0)
      b[...] = 0.9 * b + gr
      d = gr + 0.9 * b if nesterov else b
      mult = 5.0 if is_fc(path) else 3.0 if is_global_logits(path) else backbone
      return w - lr * mult * d

    ref_params = jax.tree_util.tree_map_with_path(ref, ref_params, g, buf)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_adamw_decays_kernels_only():
  c = make_config(schedule="cosine", warmup_steps=0, name="adamw", weight_decay=0.1,
                  grad_clip_norm=0.0, fc_lr_mult=1.0)
  params = toy_params()
  tx = optim.make_optimizer(c, params)
  opt_state = tx.init(params)
  m = jax.tree.map(np.zeros_like, params)
  v = jax.tree.map(np.zeros_like, params)
  ref_params = jax.tree.map(np.array, params)
  schedule = optim.learning_rate_schedule(c)
  p = params
  for t in range(1, 4):
    g = toy_grads(t)
    updates, opt_state = tx.update(g, opt_state, p)
    p = optax.apply_updates(p, updates)
    lr = float(schedule(t - 1))

    def ref(path, w, gr, m_, v_):
      m_[...] = 0.9 * m_ + 0.1 * gr
      v_[...] = 0.999 * v_ + 0.001 * gr**2
      mhat, vhat = m_ / (1 - 0.9**t), v_ / (1 - 0.999**t)
      step = mhat / (np.sqrt(vhat) + 1e-8) + (0.1 * w if is_kernel(path) else 0)
      return w - lr * step

    ref_params = jax.tree_util.tree_map_with_path(ref, ref_params, g, m, v)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_warmup_longer_than_the_run_is_clipped_to_it():
  """A 5-step smoke run of a recipe with 100 warm-up steps warms up over 4 steps."""
  c = make_config(schedule="cosine", warmup_steps=100)
  c.total_steps = 5
  schedule = optim.learning_rate_schedule(c)
  peak = 0.1 * 32 / 64
  np.testing.assert_allclose([float(schedule(s)) for s in range(5)],
                             [0, peak / 4, peak / 2, 3 * peak / 4, peak], rtol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("name", "lamb", "config.optim.name"),
    ("schedule", "linear", "config.optim.schedule"),
    ("warmup_steps", -1, "config.optim.warmup_steps"),
    ("step_boundaries", (0.75, 0.5), "config.optim.step_boundaries"),
    ("grad_clip_norm", -1.0, "config.optim.grad_clip_norm"),
    ("fc_lr_mult", 0.0, "config.optim.fc_lr_mult"),
    ("global_logits_lr_mult", -2.0, "config.optim.global_logits_lr_mult"),
    ("backbone_lr_mult", 0.0, "config.optim.backbone_lr_mult"),
    ("freeze", "res9", "config.optim.freeze='res9' matches no parameter"),
    ("freeze", "res(", "config.optim.freeze='res\\(' is not a regex"),
])
def test_bad_optim_values_name_the_key(key, value, match):
  c = make_config(**{key: value})
  if key == "step_boundaries":
    c.optim.schedule = "step"
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(c, toy_params())



@pytest.mark.parametrize("lr_mults", [
    {"fc_lr_mult": 1.0, "global_logits_lr_mult": 20.0},  # the synthetic recipes'
    {"fc_lr_mult": 1.0, "global_logits_lr_mult": 1.0}, {"fc_lr_mult": 5.0}])
def test_optimizer_state_structure_follows_from_the_config_alone(lr_mults):
  """A checkpoint's optimizer state must restore from the config: a model without
  GTA's `G` (so every multiplier is 1) gets the same chain of states as one with."""
  config = make_config(**lr_mults)
  with_g = toy_params()
  without_g = {k: v for k, v in with_g.items() if k != "res3_block0"}
  kinds = lambda params: [type(s).__name__ for s in
                          optim.make_optimizer(config, params).init(params)]
  assert kinds(with_g) == kinds(without_g)
