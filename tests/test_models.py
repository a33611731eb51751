"""Tests of the backbones and the baselines' temporal modules (TSN, TSM, Non-local)."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax.models import baselines
from gta_jax.models import build_model
from gta_jax.models import cpu_kernels
from gta_jax.models import hooks
from gta_jax.models import registry
from gta_jax.models import resnet


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(config, shape):
  model = build_model(config)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))["params"]


def perturb(variables, seed=1, std=0.5):
  """Random non-zero values for every parameter, so zero-initialised residual modules
  (Non-local's BN scale) are active."""
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {**variables, "params": jax.tree.unflatten(treedef, leaves)}


def tiny(temporal_modules="", **model_overrides):
  config = config_lib.synthetic_config(temporal_modules)
  config.data.num_frames = 4
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


@functools.lru_cache(maxsize=None)
def clip(batch=2, frames=4, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, frames, size, size, 3))


def init_apply(config, x, seed=0):
  """Returns the model, its variables and a jitted `apply(variables, x)` (eval mode)."""
  model = build_model(config)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)
  return model, variables, jax.jit(functools.partial(model.apply, train=False))


# -- parameter counts ------------------------------------------------------------


def test_resnet50_matches_torchvision_parameter_count():
  config = config_lib.ssv2_config(8)
  params = abstract_params(config, (1, 8, 224, 224, 3))
  body = {k: v for k, v in params.items() if k != "head"}
  # torchvision.models.resnet50(): 25,557,032 parameters, of which fc is 2048*1000+1000.
  assert count_params(body) == 25_557_032 - (2048 * 1000 + 1000)
  assert count_params(params) == 23_508_032 + 2048 * 174 + 174


def test_resnet18_matches_torchvision_parameter_count():
  config = config_lib.ssv2_config(8)
  config.model.depth = 18
  params = abstract_params(config, (1, 8, 224, 224, 3))
  # torchvision.models.resnet18(): 11,689,512 parameters with a 512*1000+1000 fc.
  assert count_params({k: v for k, v in params.items() if k != "head"}) == (
      11_689_512 - (512 * 1000 + 1000))


def test_tsm_adds_no_parameters():
  tsn = abstract_params(config_lib.ssv2_config(8), (1, 8, 64, 64, 3))
  tsm = abstract_params(config_lib.ssv2_config(8, "tsm"), (1, 8, 64, 64, 3))
  assert count_params(tsm) == count_params(tsn)


def test_i3d_inflates_only_the_configured_stages():
  config = config_lib.k400_3d_config(8, 8)
  params = abstract_params(config, (1, 8, 64, 64, 3))
  assert params["res4_block0"]["conv1"]["conv"]["kernel"].shape == (3, 1, 1, 512, 256)
  assert params["res5_block2"]["conv1"]["conv"]["kernel"].shape == (3, 1, 1, 2048, 512)
  assert params["res3_block0"]["conv1"]["conv"]["kernel"].shape == (1, 1, 256, 128)
  inflated = sum(int(np.prod(params[f"res{s}_block{b}"]["conv1"]["conv"]["kernel"].shape))
                 for s, n in ((4, 6), (5, 3)) for b in range(n))
  flat = count_params(abstract_params(config_lib.k400_config(8), (1, 8, 64, 64, 3)))
  assert count_params(params) == flat + 2 * inflated // 3


# -- order (in)sensitivity ---------------------------------------------------------


@pytest.mark.parametrize("modules,kind", [("", None), ("nl", "3d"), ("nl", "2d"),
                                          ("nl", "1d"), ("nl", "2d+1d")])
def test_order_blind_models_cannot_tell_a_clip_from_its_reverse(modules, kind):
  config = tiny(modules)
  if kind:
    config.model.nl.kind = kind
  x = clip()
  _, variables, apply = init_apply(config, x)
  variables = perturb(variables)
  forward = apply(variables, x)
  backward = apply(variables, x[:, ::-1])
  np.testing.assert_allclose(forward, backward, rtol=1e-4, atol=1e-5)
  # The perturbed model is not constant: another clip gives other logits.
  other = apply(variables, clip(seed=1))
  assert np.abs(np.asarray(forward - other)).max() > 1e-3


def test_tsm_sees_frame_order():
  config = tiny("tsm")
  x = clip()
  _, variables, apply = init_apply(config, x)
  forward = apply(variables, x)
  backward = apply(variables, x[:, ::-1])
  assert np.abs(np.asarray(forward - backward)).max() > 1e-4


def test_temporal_shift_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 3, 16)))
  fold = 16 // 8
  expected = np.zeros_like(x)
  for t in range(5):
    if t + 1 < 5:
      expected[:, t, ..., :fold] = x[:, t + 1, ..., :fold]
    if t - 1 >= 0:
      expected[:, t, ..., fold:2 * fold] = x[:, t - 1, ..., fold:2 * fold]
    expected[:, t, ..., 2 * fold:] = x[:, t, ..., 2 * fold:]
  np.testing.assert_array_equal(baselines.temporal_shift(jnp.asarray(x)), expected)


# -- shapes, dtypes, gradients -----------------------------------------------------------


@pytest.mark.parametrize("config_fn", [
    lambda: tiny(""), lambda: tiny("tsm"), lambda: tiny("nl"),
    lambda: tiny("", depth=18, stage_sizes="1,1,1,1"),
])
def test_tiny_models_train_forward_and_backward(config_fn):
  config = config_fn()
  x = clip()
  model, variables, _ = init_apply(config, x)
  labels = jnp.array([1, 3])

  def loss_fn(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  assert np.isfinite(loss)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_3d_model_gives_finite_logits_of_the_right_shape():
  config = config_lib.k400_3d_config(8, 8)
  config.model.stage_sizes = "1,1,2,1"
  config.model.width = 8
  x = clip(batch=1, frames=8, size=64)
  _, variables, apply = init_apply(config, x)
  logits = apply(variables, x)
  assert logits.shape == (1, 400) and np.all(np.isfinite(logits))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = tiny("tsm", dtype="bfloat16")
  x = clip()
  _, variables, apply = init_apply(config, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  logits = apply(variables, x)
  assert logits.dtype == jnp.float32
  _, _, reference_apply = init_apply(tiny("tsm"), x)
  reference = reference_apply(variables, x)
  # Each of the `depth` matmul layers (stem, 3 convs per block, classifier) takes
  # its input rounded to bf16, a relative error of at most eps; BatchNorm keeps
  # the scale, so the errors add up along the depth, as a random walk:
  # |error| <= sqrt(depth) eps max|logits| (3.7 eps here). Measured: 0.32 eps
  # (0.43 eps with every parameter perturbed by N(0, 0.1)); the former bound,
  # atol 0.05, was 0.39 of the largest logit. A softmax computed in bf16 does not
  # stand out at this depth (a TSM with Non-local blocks: 0.024 -> 0.031 on 7.2
  # logits); tests/test_attention.py bounds the attention alone and catches it.
  depth = 2 + 3 * sum(registry.stage_sizes(config.model))
  bound = depth**0.5 * float(jnp.finfo(jnp.bfloat16).eps) * float(jnp.max(jnp.abs(reference)))
  assert float(jnp.max(jnp.abs(logits - reference))) <= bound


def test_conv_padding_matches_torchvision_output_sizes():
  # torchvision ResNet at 224: 112 after the stem conv, 56 after max-pool, then 28/14/7.
  config = config_lib.ssv2_config(1)
  model = build_model(config)
  x = jnp.zeros((1, 1, 224, 224, 3))
  _, state = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), x, train=False, capture_intermediates=True))
  inter = flax.traverse_util.flatten_dict(state["intermediates"], sep="/")
  shape = lambda name: inter[f"{name}/__call__"][0].shape
  assert shape("stem_conv") == (1, 1, 112, 112, 64)
  assert shape("res2_block0") == (1, 1, 56, 56, 256)
  assert shape("res5_block2") == (1, 1, 7, 7, 2048)



@pytest.mark.parametrize("cin,cout,stride", [(8, 24, 1), (24, 8, 1), (16, 16, 2)])
def test_pointwise_convolution_matches_lax_in_value_and_gradients(cin, cout, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 6, 6, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 1, cin, cout)), jnp.float32)
  dims = jax.lax.conv_dimension_numbers(x.shape[1:], w.shape, ("NHWC", "HWIO", "NHWC"))

  def conv(fn, x, w):  # (B, T) folded into the batch, as flax does.
    y = fn(x.reshape((-1,) + x.shape[2:]), w, (stride, stride), ((0, 0), (0, 0)),
           dimension_numbers=dims, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape[:2] + y.shape[1:])

  out, vjp = jax.vjp(functools.partial(conv, cpu_kernels.conv_or_matmul), x, w)
  expected, expected_vjp = jax.vjp(functools.partial(conv, jax.lax.conv_general_dilated), x, w)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for grad, expected_grad in zip(vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)


def numpy_max_pool_grad(x, grad, size, stride, pad):
  """dL/dx of a max-pool over (H, W) of (N, H, W, C): each window's gradient to its
  first maximum in row-major order."""
  dx = np.zeros_like(x)
  n, h, w, c = x.shape
  for b, p, q, ch in np.ndindex(grad.shape):
    best = None
    for i in range(p * stride - pad, p * stride - pad + size):
      for j in range(q * stride - pad, q * stride - pad + size):
        if 0 <= i < h and 0 <= j < w and (best is None or x[b, i, j, ch] > x[b][best][ch]):
          best = (i, j)
    dx[b, best[0], best[1], ch] += grad[b, p, q, ch]
  return dx


@pytest.mark.parametrize("size,stride,pad,hw", [(3, 2, 1, (9, 8)), (3, 2, 1, (8, 8)),
                                                (2, 2, 0, (6, 7)), (3, 1, 1, (5, 5))])
def test_max_pool_matches_flax_and_a_numpy_gradient(size, stride, pad, hw):
  rng = np.random.default_rng(0)
  # Rounded ReLU outputs: many ties, which must all go to the window's first maximum.
  x = np.maximum(np.round(rng.standard_normal((2,) + hw + (3,)), 1), 0).astype(np.float32)
  out = cpu_kernels.max_pool(jnp.asarray(x), size, stride, pad)
  reference = flax.linen.max_pool(jnp.asarray(x), (size, size), (stride, stride),
                                  ((pad, pad), (pad, pad)))
  np.testing.assert_array_equal(out, reference)
  grad = rng.standard_normal(out.shape).astype(np.float32)
  dx = jax.grad(lambda v: jnp.sum(cpu_kernels.max_pool(v, size, stride, pad) * grad))(
      jnp.asarray(x))
  np.testing.assert_allclose(dx, numpy_max_pool_grad(x, grad, size, stride, pad),
                             rtol=1e-6, atol=1e-6)

# -- BatchNorm groups ------------------------------------------------------------------


def test_bn_group_size_must_divide_the_batch():
  config = tiny(bn_group_size=3)
  model = build_model(config)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), clip())
  with pytest.raises(ValueError, match="bn_group_size=3 does not divide the batch of 2"):
    jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                   variables, clip())


# Train-mode forward and backward of two conv+BN+ReLU layers on 8 clips, the
# batch sharded over a mesh of 1 and of 4 CPU devices, in global and group-of-2 BN.
DEVICE_COUNT_SCRIPT = textwrap.dedent("""
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gta_jax.models import resnet

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        for i in range(2):
          x = resnet.VideoConv(8, (1, 3, 3), name=f"conv{i}")(x)
          x = nn.relu(resnet.batch_norm(True, jnp.float32)(name=f"bn{i}")(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2, 3)))

    x = jax.random.normal(jax.random.key(0), (8, 4, 8, 8, 3))
    labels = jnp.arange(8) % 10
    variables = Net().init(jax.random.key(0), x)

    def loss_fn(params, batch, group_size):
      with resnet.bn_options(resnet.BatchNormOptions(group_size)):
        logits, updates = Net().apply({**variables, "params": params}, batch,
                                      mutable=["batch_stats"])
      onehot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

    report, first = {}, {}
    for group_size in (0, 2):
      results = []
      for n in (1, 4):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        batch = jax.device_put(x, NamedSharding(mesh, P("data")))
        params = jax.device_put(variables["params"], NamedSharding(mesh, P()))
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)
        results.append(jax.tree.leaves(jax.device_get(step(params, batch, group_size))))
      first[group_size] = results[0]
      report[group_size] = max(float(np.max(np.abs(a - b))) for a, b in zip(*results))
    report["groups_vs_global"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(first[0], first[2]))
    print(json.dumps({"devices": jax.device_count(), **report}))
""")


def test_batch_norm_results_do_not_depend_on_the_device_count():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", DEVICE_COUNT_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4
  assert report["0"] < 1e-5 and report["2"] < 1e-5, report
  # Groups of 2 clips normalise differently from the whole batch of 8.
  assert report["groups_vs_global"] > 1e-2, report


# -- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("temporal_modules", "tsm,bogus", "temporal_modules"),
    ("depth", 42, "config.model.depth"),
    ("arch", "vit", "config.model.arch"),
    ("dtype", "float16", "config.model.dtype"),
    ("stage_sizes", "1,2", "config.model.stage_sizes"),
])
def test_bad_model_keys_are_named(key, value, message):
  config = tiny()
  config.model[key] = value
  with pytest.raises(ValueError, match=message):
    build_model(config)


@pytest.mark.parametrize("placement,message", [
    ("res3:0,7", "res3 has blocks 0..0"),
    ("res9:0", "res9:0"),
    ("res3:x", "not an integer"),
])
def test_bad_placements_are_named(placement, message):
  config = tiny("nl")
  config.model.nl.placement = placement
  with pytest.raises(ValueError, match=message):
    build_model(config)


def test_placement_strings():
  sizes = (3, 4, 6, 3)
  assert hooks.parse_placement("res3:0,2;res4:0,2,4", sizes) == {
      (1, 0), (1, 2), (2, 0), (2, 2), (2, 4)}
  assert len(hooks.parse_placement("all", sizes)) == 16
  assert hooks.parse_placement("res5:all", sizes) == {(3, 0), (3, 1), (3, 2)}
  assert hooks.parse_placement("", sizes) == frozenset()


def test_two_modules_on_one_hook_point_are_refused():
  config = tiny("nl")
  config.model.temporal_modules = "nl,nl"
  with pytest.raises(ValueError, match="already has a 'post' module"):
    build_model(config)


@pytest.mark.parametrize("shape,message", [
    ((2, 5, 32, 32, 3), "built for clips of 4 frames"),
    ((2, 4, 32, 32), r"\(B, T, H, W, 3\)"),
    ((2, 4, 32, 32, 1), r"\(B, T, H, W, 3\)"),
])
def test_clips_the_model_cannot_take_are_refused(shape, message):
  model = build_model(tiny())
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), clip())
  with pytest.raises(ValueError, match=message):
    model.apply(variables, jnp.zeros(shape), train=False)
