"""ResNet backbones for video, 2D (TSN-style) and 3D (I3D/SlowOnly-style).

Both kinds keep the clip as `(B, T, H, W, C)` from end to end. A 2D network uses 2D
kernels, which flax applies with `(B, T)` as batch dimensions: frames are folded into
the batch without a reshape, and temporal modules see `(B, T, H, W, C)` directly. A 3D
network uses `(kt, kh, kw)` kernels where the config inflates a stage; its T may shrink
with a temporal stride in the stem.

Layout and names follow torchvision (bottleneck v1.5: the stride is on the 3x3 conv),
so that ImageNet weights map one to one (see `gta_jax.pretrained`):
`stem_conv`, `stem_bn`, `res{2..5}_block{i}/{conv1,bn1,conv2,bn2,conv3,bn3,
downsample_conv,downsample_bn}`, `head/fc`.

Temporal modules attach to blocks at three hook points:

* `pre`: on the residual branch before `conv1` (TSM's residual shift);
* `inner`: after `conv1`/`bn1`/ReLU, its output replaces the feature (SSA);
* `post`: after the block's output, a residual module of its own (Non-local, GTA).

Every hook module is called as `module(x, train=...)` on `(B, T, H, W, C)` and
returns the same shape.

While the network is traced it puts its backend options (`backend.options`:
attention implementation, XLA:CPU kernels) and its BatchNorm options
(:func:`bn_options`: statistics over the batch or groups, the variance's
computation, the running variance's update) in force for every layer, temporal
modules included.
"""

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gta_jax.models import backend
from gta_jax.models import cpu_kernels

ModuleDef = Any
HookKey = Tuple[int, int, str]  # (stage, block, 'pre' | 'inner' | 'post')
HOOK_POSITIONS = ("pre", "inner", "post")
# The `features` collection (`apply(..., mutable=["features"])`): pooled vectors
# `(B, C)` of each stage's output and the classifier's input.
FEATURES = "features"
PRE_LOGITS = "pre_logits"
FEATURE_LAYERS = (PRE_LOGITS, "res2", "res3", "res4", "res5")

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class BatchNormOptions:
  """How the BatchNorms of a network compute their training statistics.

  Attributes:
    group_size: statistics over groups of this many examples (the per-GPU
      BatchNorm of the PyTorch recipes); 0: over the whole (global) batch.
    two_pass_variance: the variance as `E[(x - E[x])^2]`, a second pass over
      the activations, accurate in float32 whatever the mean; else
      `E[x^2] - E[x]^2` in one pass (flax's `use_fast_variance`), which loses
      float32 digits when the mean is large against the spread (mean/std = 100:
      3.0e-3 off float64 against 1.0e-5), and about 2% faster in a TSM-R50
      train step on a 2-core CPU (docs/baselines.md).
    running_var_unbiased: update the running variance with the unbiased
      variance, `n / (n - 1)` times the one that normalises (n values per
      channel and group), as PyTorch does; else with that biased one, as flax.
  """
  group_size: int = 0
  two_pass_variance: bool = False
  running_var_unbiased: bool = False


_BN_OPTIONS: contextvars.ContextVar[BatchNormOptions] = contextvars.ContextVar(
    "gta_jax_bn_options", default=BatchNormOptions())


def conv_general_dilated(*args, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated`, or on CPU its XLA:CPU kernel for 1x1 kernels."""
  if backend.current().use_cpu_kernels:
    return cpu_kernels.conv_or_matmul(*args, **kwargs)
  return jax.lax.conv_general_dilated(*args, **kwargs)


def max_pool(x: jax.Array, size: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Spatial max-pooling of `(..., H, W, C)`; on CPU, the XLA:CPU kernel."""
  if backend.current().use_cpu_kernels:
    return cpu_kernels.max_pool(x, size, stride, pad)
  y = nn.max_pool(x.reshape((-1,) + x.shape[-3:]), (size, size), (stride, stride),
                  ((pad, pad), (pad, pad)))
  return y.reshape(x.shape[:-3] + y.shape[1:])


class VideoConv(nn.Module):
  """A bias-free convolution on `(B, T, H, W, C)` with torchvision padding.

  A temporal kernel and stride of 1 give a 2D convolution with `(B, T)` as batch
  dimensions; otherwise a 3D convolution over `(T, H, W)`. Padding is `k // 2` on
  each side (torchvision's), not 'SAME', so strided outputs match PyTorch.

  Attributes:
    features: output channels.
    kernel: `(kt, kh, kw)`.
    strides: `(st, sh, sw)`.
    dtype: compute dtype; parameters stay float32.
  """
  features: int
  kernel: Tuple[int, int, int] = (1, 1, 1)
  strides: Tuple[int, int, int] = (1, 1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, strides = tuple(self.kernel), tuple(self.strides)
    if kernel[0] == 1 and strides[0] == 1:
      kernel, strides = kernel[1:], strides[1:]
    padding = tuple((k // 2, k // 2) for k in kernel)
    return nn.Conv(self.features, kernel, strides, padding=padding, use_bias=False,
                   dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=conv_kernel_init, conv_general_dilated=conv_general_dilated,
                   name="conv")(x)


@contextlib.contextmanager
def bn_options(options: BatchNormOptions) -> Iterator[None]:
  """BatchNorms built in this block (:func:`batch_norm`) train with `options`."""
  token = _BN_OPTIONS.set(options)
  try:
    yield
  finally:
    _BN_OPTIONS.reset(token)


def batch_norm(train: bool, dtype: Any, **kwargs) -> ModuleDef:
  """BatchNorm with PyTorch's defaults (momentum 0.1 in its terms, eps 1e-5).

  Statistics and normalisation are float32 whatever `dtype`. In training, a
  :class:`TrainingBatchNorm` with the :func:`bn_options` in force (under `jit` a
  sharded batch's statistics are reduced over all devices); in evaluation,
  `nn.BatchNorm` with the running statistics. Both have the same variables.
  """
  common = dict(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                **kwargs)
  if train:
    return functools.partial(TrainingBatchNorm, _BN_OPTIONS.get(), **common)
  return functools.partial(nn.BatchNorm, use_running_average=True, **common)


class TrainingBatchNorm(nn.Module):
  """Training-mode BatchNorm over the batch or over groups of examples.

  The batch `(B, ...)` is normalised with its float32 mean and (biased) variance
  per channel, over all of it or, with `options.group_size`, over each group of
  that many consecutive examples: the per-GPU BatchNorm of the PyTorch recipes,
  where each GPU normalises its own share of the batch, made independent of the
  device count. The running statistics move towards the batch's (or the groups'
  average): `ra = momentum * ra + (1 - momentum) * value`. Variables and
  initialisers are those of `nn.BatchNorm`, so checkpoints and evaluation (with
  `nn.BatchNorm` on the running statistics) are the same as with it.

  Attributes:
    options: group size, the variance's computation and the running variance's
      update (:class:`BatchNormOptions`).
    momentum: of the running statistics.
    epsilon: added to the variance.
    dtype: output dtype.
    param_dtype: dtype of `scale` and `bias`.
    scale_init: initialiser of `scale`.
    bias_init: initialiser of `bias`.
  """
  options: BatchNormOptions = BatchNormOptions()
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    group_size = self.options.group_size or b
    if b % group_size:
      raise ValueError(f"config.model.bn_group_size={group_size} does not divide "
                       f"the batch of {b} examples (shape {x.shape})")
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)

    groups = x.reshape((b // group_size, group_size) + x.shape[1:]).astype(jnp.float32)
    axes = tuple(range(1, groups.ndim - 1))
    mean = jnp.mean(groups, axes, keepdims=True)
    if self.options.two_pass_variance:
      var = jnp.mean(jnp.square(groups - mean), axes, keepdims=True)
    else:
      mean_sq = jnp.mean(jnp.square(groups), axes, keepdims=True)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    if not self.is_initializing():
      count = groups.size // (groups.shape[0] * c)  # values per channel and group
      running_var = var * (count / max(count - 1, 1)) if (
          self.options.running_var_unbiased) else var
      for ra, value in ((ra_mean, mean), (ra_var, running_var)):
        group_average = value.reshape(-1, c).mean(axis=0)
        ra.value = self.momentum * ra.value + (1 - self.momentum) * group_average
    y = (groups - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


class ResidualBlock(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block.

  Attributes:
    filters: width of the block (the bottleneck's inner width).
    bottleneck: bottleneck (ResNet-50+) or basic block (ResNet-18/34).
    stride: spatial stride, on the 3x3 conv (v1.5).
    temporal_kernel: kt of the first conv (1 for 2D; 3 in inflated 3D stages).
    hooks: `(position, factory)` pairs of temporal modules (`pre`, `inner`, `post`).
    zero_init_residual: initialise the last BN's scale to zero.
    dtype: compute dtype.
  """
  filters: int
  bottleneck: bool = True
  stride: int = 1
  temporal_kernel: int = 1
  hooks: Tuple[Tuple[str, Callable[..., nn.Module]], ...] = ()
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hooks = dict(self.hooks)
    norm = batch_norm(train, self.dtype)
    conv = functools.partial(VideoConv, dtype=self.dtype)
    kt, s = self.temporal_kernel, self.stride
    out_features = self.filters * (4 if self.bottleneck else 1)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones

    y = x
    if "pre" in hooks:
      y = hooks["pre"](name="pre")(y, train=train)
    if self.bottleneck:
      y = nn.relu(norm(name="bn1")(conv(self.filters, (kt, 1, 1), name="conv1")(y)))
      if "inner" in hooks:
        y = hooks["inner"](name="inner")(y, train=train)
      y = nn.relu(norm(name="bn2")(conv(self.filters, (1, 3, 3), (1, s, s),
                                        name="conv2")(y)))
      y = norm(name="bn3", scale_init=last_scale)(
          conv(out_features, (1, 1, 1), name="conv3")(y))
    else:
      y = nn.relu(norm(name="bn1")(conv(self.filters, (kt, 3, 3), (1, s, s),
                                        name="conv1")(y)))
      if "inner" in hooks:
        y = hooks["inner"](name="inner")(y, train=train)
      y = norm(name="bn2", scale_init=last_scale)(
          conv(out_features, (1, 3, 3), name="conv2")(y))

    shortcut = x
    if x.shape[-1] != out_features or s != 1:
      shortcut = norm(name="downsample_bn")(
          conv(out_features, (1, 1, 1), (1, s, s), name="downsample_conv")(x))
    out = nn.relu(shortcut + y)
    if "post" in hooks:
      out = hooks["post"](name="post")(out, train=train)
    return out


class ClassificationHead(nn.Module):
  """Global average pooling, dropout and a linear classifier.

  With `frame_consensus` (2D networks) each frame is classified and the logits are
  averaged over time (TSN's average consensus); otherwise the clip is pooled over
  `(T, H, W)` and classified once. Logits are float32 whatever the compute dtype.
  The pre-logits, the pooled vector `(B, C)` whose image under the classifier are the
  logits (frames averaged), are sown as `features/head/pre_logits`. With
  `num_classes=0` there is no classifier: the pre-logits are the output (a video
  encoder, e.g. for text-video retrieval).
  """
  num_classes: int
  dropout_rate: float = 0.0
  frame_consensus: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    pool_axes = (2, 3) if self.frame_consensus else (1, 2, 3)
    x = jnp.mean(x, axis=pool_axes)
    if not self.num_classes:
      return jnp.mean(x, axis=1) if self.frame_consensus else x
    if not self.is_initializing():  # `init` returns no `features` collection
      self.sow(FEATURES, PRE_LOGITS, jnp.mean(x, axis=1) if self.frame_consensus else x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                 name="fc")(x)
    return jnp.mean(x, axis=1) if self.frame_consensus else x


class VideoResNet(nn.Module):
  """ResNet over clips `(B, T, H, W, 3)` -> logits `(B, num_classes)` (or, with
  `num_classes=0`, the pooled features `(B, C)`).

  With `mutable=[FEATURES]`, `apply` also returns each stage's output pooled over
  `(T, H, W)` (`features/res2` ... `features/res5`) and the pre-logits
  (`features/head/pre_logits`), all `(B, C)` float32 (see :func:`pooled_feature`).

  Attributes:
    stage_sizes: residual blocks per stage, e.g. `(3, 4, 6, 3)` for ResNet-50.
    num_classes: classifier outputs; 0: no classifier.
    num_frames: the clip length the model is built for; other lengths are refused.
    bottleneck: bottleneck blocks (50/101/152) or basic blocks (18/34).
    width: channels of the first stage (64 in the papers).
    small_stem: a 3x3 stride-1 stem without max-pool, for tiny inputs (32px).
    inflated_blocks: `(stage, block)` pairs whose first conv has kt=3 (3D stages).
    stem_temporal_kernel: kt of the stem conv (1 for 2D and SlowOnly; 5 for I3D).
    stem_temporal_stride: temporal stride of the stem conv.
    pool1_temporal_stride: temporal stride of the stem's max-pool (its temporal
      kernel is 1: every other frame at 2), as mmaction2's I3D `pool1_stride_t`.
    pool2: max-pool pairs of frames after res2 (mmaction2's I3D `with_pool2`).
    frame_consensus: TSN average consensus (2D) or clip pooling (3D).
    dropout_rate: dropout before the classifier.
    zero_init_residual: zero-initialise the last BN of each block.
    hooks: `((stage, block, position), factory)` pairs of temporal modules.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
    attention_impl: `backend.ATTENTION_IMPLS`; `auto` chooses per platform.
    cpu_kernels: use the XLA:CPU kernels (`cpu_kernels.py`) on CPU.
    bn_group_size: BatchNorm statistics in training over groups of this many
      clips; 0: over the whole (global) batch.
    bn_two_pass_variance: BatchNorm's variance in two passes (see
      :class:`BatchNormOptions`).
    bn_running_var_unbiased: BatchNorm's running variance with the unbiased
      batch variance, as PyTorch (see :class:`BatchNormOptions`).
  """
  stage_sizes: Sequence[int]
  num_classes: int
  num_frames: int
  bottleneck: bool = True
  width: int = 64
  small_stem: bool = False
  inflated_blocks: Tuple[Tuple[int, int], ...] = ()
  stem_temporal_kernel: int = 1
  stem_temporal_stride: int = 1
  pool1_temporal_stride: int = 1
  pool2: bool = False
  frame_consensus: bool = True
  dropout_rate: float = 0.0
  zero_init_residual: bool = False
  hooks: Tuple[Tuple[HookKey, Callable[..., nn.Module]], ...] = ()
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  cpu_kernels: bool = True
  bn_group_size: int = 0
  bn_two_pass_variance: bool = False
  bn_running_var_unbiased: bool = False

  def check_input(self, video: jax.Array) -> None:
    """Raises a ValueError naming the shape when the clip cannot be taken."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"expected a clip of shape (B, T, H, W, 3), got {video.shape}")
    if video.shape[1] != self.num_frames:
      raise ValueError(
          f"this model was built for clips of {self.num_frames} frames (config "
          f"data.num_frames), got T={video.shape[1]} in shape {video.shape}")
    min_size = 8 if self.small_stem else 32
    if min(video.shape[2:4]) < min_size:
      raise ValueError(f"frames of {video.shape[2:4]} are too small for this "
                       f"backbone: at least {min_size}x{min_size}")

  def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
    self.check_input(video)
    with backend.options(self.attention_impl, self.cpu_kernels), \
        bn_options(BatchNormOptions(self.bn_group_size, self.bn_two_pass_variance,
                                    self.bn_running_var_unbiased)):
      return self.network(video, train)

  @nn.compact
  def network(self, video: jax.Array, train: bool) -> jax.Array:
    """The layers, in this model's backend options and BatchNorm groups."""
    hooks = {}
    for (stage, block, position), factory in self.hooks:
      hooks.setdefault((stage, block), []).append((position, factory))
    norm = batch_norm(train, self.dtype)

    x = video.astype(self.dtype)
    if self.small_stem:
      x = VideoConv(self.width, (self.stem_temporal_kernel, 3, 3),
                    (self.stem_temporal_stride, 1, 1), dtype=self.dtype,
                    name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    else:
      x = VideoConv(self.width, (self.stem_temporal_kernel, 7, 7),
                    (self.stem_temporal_stride, 2, 2), dtype=self.dtype,
                    name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = max_pool(x, size=3, stride=2, pad=1)[:, ::self.pool1_temporal_stride]

    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = ResidualBlock(
            filters=self.width * 2**stage,
            bottleneck=self.bottleneck,
            stride=2 if stage > 0 and block == 0 else 1,
            temporal_kernel=3 if (stage, block) in self.inflated_blocks else 1,
            hooks=tuple(hooks.get((stage, block), ())),
            zero_init_residual=self.zero_init_residual,
            dtype=self.dtype,
            name=f"res{stage + 2}_block{block}")(x, train=train)
      if stage == 0 and self.pool2:  # PyTorch's MaxPool3d((2, 1, 1)): odd T drops one
        pairs = x[:, :x.shape[1] // 2 * 2]
        x = jnp.maximum(pairs[:, 0::2], pairs[:, 1::2])
      if not self.is_initializing():
        self.sow(FEATURES, f"res{stage + 2}", jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3)))

    return ClassificationHead(self.num_classes, self.dropout_rate,
                              self.frame_consensus, name="head")(x, train=train)


def check_feature_layer(layer: str) -> str:
  """Raises a ValueError naming the choices unless `layer` is in `FEATURE_LAYERS`."""
  if layer not in FEATURE_LAYERS:
    raise ValueError(f"unknown feature layer {layer!r}; choose one of {FEATURE_LAYERS}")
  return layer


def pooled_feature(features, layer: str = PRE_LOGITS) -> jax.Array:
  """The `(B, C)` vector of `layer` (one of `FEATURE_LAYERS`) from the `features`
  collection that `apply(..., mutable=[FEATURES])` returns."""
  check_feature_layer(layer)
  return (features["head"] if layer == PRE_LOGITS else features)[layer][0]
