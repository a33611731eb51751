"""The train and eval steps of every model family lower for CUDA and TPU.

`jax.export` traces and lowers a jitted function for a platform this machine
does not have (no compilation), with the model's backend policy forced to that
platform's choices (`backend.force_platform`): plain `lax` convolutions and
pooling instead of the XLA:CPU kernels, `jax.nn.dot_product_attention` on GPU,
XLA's or the Pallas flash kernel on TPU.

What cannot lower here: cuDNN's fused attention (`implementation='cudnn'`, the
GPU choice for bf16 attention with head sizes up to 128) needs the CUDA plugin
and cuDNN installed (`jax[cuda]`, a 700 MB wheel kept out of CI); without them
`jax.nn.dot_product_attention` raises "cuDNN is not detected". The CUDA
lowerings below therefore force its fallback, `attention_impl='xla'`, and
:func:`test_cudnn_attention_lowers_only_with_the_cuda_plugin` checks that the
cuDNN path fails for that reason alone (or lowers, where the plugin is there).
The Pallas TPU kernel exports here; its Mosaic compilation happens on a TPU.
"""

import functools

import jax
from jax import export
import jax.numpy as jnp
import pytest

from gta_jax import config_lib
from gta_jax.models import backend
from gta_jax.training import state as state_lib
from gta_jax.training import steps

BATCH, VIEWS = 2, 2


def tiny(temporal_modules, arch="resnet2d", crop=32, **model):
  """A bf16, width-8, one-block-per-stage net on 4 x crop^2 clips, with the
  ImageNet stem (its max-pool included)."""
  c = config_lib.synthetic_config(temporal_modules)
  c.data.num_frames, c.data.crop_size = 4, crop
  c.model.update(arch=arch, small_stem=False, dtype="bfloat16", **model)
  return c


def i3d(temporal_modules, **model):
  c = tiny(temporal_modules, "resnet3d", **model)
  c.model.resnet3d.update(inflate="res4:all;res5:all", stem_temporal_kernel=5)
  return c


MODELS = {
    "tsn": lambda: tiny(""),
    "tsm": lambda: tiny("tsm"),
    "gta": lambda: tiny("gta"),
    "gta_i3d": lambda: i3d("gta"),
    "ssa": lambda: tiny("ssa"),
    # 64px: res3's 4 x 8 x 8 = 256 positions divide into the flash kernel's blocks.
    "nl3d": lambda: i3d("nl", crop=64),
}
# The platform's attention in these lowerings: auto, except cuDNN's fallback on
# CUDA (see the module docstring) and the flash kernel for the 3D Non-local on TPU.
ATTENTION = {"cuda": "xla", "tpu": "auto"}
PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}


def uint8_clips(shape):
  return jax.ShapeDtypeStruct(shape, jnp.uint8)


def lower_steps(config, platform):
  """Exports the train step and the multi-view eval step of `config`."""
  t, crop = config.data.num_frames, config.data.crop_size
  label = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  train_batch = {"video": uint8_clips((BATCH, t, crop, crop, 3)), "label": label}
  eval_batch = {"video": uint8_clips((BATCH, VIEWS, t, crop, crop, 3)), "label": label}
  with backend.force_platform(PLATFORMS[platform]):
    model, tx, _, abstract_state = state_lib.build(config)
    export_for = functools.partial(export.export, platforms=(platform,))
    train = export_for(steps.make_train_step(model, tx))(abstract_state, train_batch)
    evaluate = export_for(steps.make_eval_step(model))(abstract_state.variables,
                                                       eval_batch)
  return train, evaluate


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(MODELS))
def test_train_and_eval_steps_lower(name, platform):
  config = MODELS[name]()
  config.model.attention_impl = ATTENTION[platform]
  if name == "nl3d" and platform == "tpu":
    config.model.attention_impl = "pallas"
  train, evaluate = lower_steps(config, platform)
  assert train.platforms == evaluate.platforms == (platform,)
  text = train.mlir_module()
  assert "reduce_window" in text  # flax's max-pool, not the XLA:CPU kernel
  if name == "nl3d" and platform == "tpu":
    assert "tpu_custom_call" in text  # the Pallas flash kernel
  else:
    assert "tpu_custom_call" not in text
  probs = jax.tree.unflatten(evaluate.out_tree, evaluate.out_avals)["probs"]
  assert probs.shape == (BATCH, config.model.num_classes)


def cuda_plugin_installed():
  try:
    return any(d.platform == "gpu" for d in jax.devices("cuda"))
  except RuntimeError:
    return False


def test_cudnn_attention_lowers_only_with_the_cuda_plugin():
  config = MODELS["gta"]()  # bf16, spatial attention heads of 64: cuDNN's
  if cuda_plugin_installed():
    train, _ = lower_steps(config, "cuda")
    assert "cudnn" in train.mlir_module()
  else:
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
      lower_steps(config, "cuda")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("encoder", ["max", "transformer"])
def test_retrieval_steps_lower(encoder, platform):
  """The retrieval train step (a GTA video side, both text encoders) and its video
  and caption embedding steps lower for the platform's ops."""
  from gta_jax.retrieval import steps as retrieval_steps  # pylint: disable=g-import-not-at-top
  config = config_lib.retrieval_synthetic_config("gta")
  config.data.num_frames, config.data.crop_size = 4, 32
  config.model.update(small_stem=False, dtype="bfloat16", attention_impl=ATTENTION[platform])
  config.text.encoder = encoder
  t, crop, words = 4, 32, config.text.max_words
  text = {"tokens": jax.ShapeDtypeStruct((BATCH, words), jnp.int32),
          "token_mask": jax.ShapeDtypeStruct((BATCH, words), jnp.bool_)}
  index = jax.ShapeDtypeStruct((BATCH,), jnp.int64 if jax.config.jax_enable_x64
                               else jnp.int32)
  with backend.force_platform(PLATFORMS[platform]):
    model, tx, _, abstract_state = state_lib.build(config)
    export_for = functools.partial(export.export, platforms=(platform,))
    train = export_for(retrieval_steps.make_train_step(model, tx, loss="max_margin",
                                                       margin=0.1))(
        abstract_state, dict(text, video=uint8_clips((BATCH, t, crop, crop, 3)),
                             video_index=index))
    videos = export_for(retrieval_steps.make_video_step(model))(
        abstract_state.variables, {"video": uint8_clips((BATCH, VIEWS, t, crop, crop, 3))})
    captions = export_for(retrieval_steps.make_text_step(model))(
        abstract_state.variables, text)
  assert train.platforms == videos.platforms == captions.platforms == (platform,)
  assert "reduce_window" in train.mlir_module()  # flax's max-pool: no XLA:CPU kernel
  for exported in (videos, captions):
    out = jax.tree.unflatten(exported.out_tree, exported.out_avals)["features"]
    assert out.shape == (BATCH, config.retrieval.embed_dim)
