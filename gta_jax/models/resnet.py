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
"""

import functools
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
HookKey = Tuple[int, int, str]  # (stage, block, 'pre' | 'inner' | 'post')
HOOK_POSITIONS = ("pre", "inner", "post")

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_or_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                   **kwargs) -> jax.Array:
  """`lax.conv_general_dilated`, with 1x1 kernels as a strided slice and a matmul.

  Same maths, same parameters; XLA:CPU runs the gradients of a 1x1 convolution
  about 2x slower than those of the equivalent matmul (benchmarks/README.md).
  Other kernels, and layouts other than channels-last, go to the convolution.
  """
  unit = lambda v: v is None or all(i == 1 for i in v)
  dims = kwargs.get("dimension_numbers")
  channels_last = (dims is not None and dims.lhs_spec[1] == lhs.ndim - 1
                   and dims.out_spec[1] == lhs.ndim - 1)
  pointwise = (channels_last and unit(rhs.shape[:-2]) and not isinstance(padding, str)
               and all(tuple(p) == (0, 0) for p in padding)
               and kwargs.get("feature_group_count", 1) == 1
               and unit(kwargs.get("lhs_dilation")) and unit(kwargs.get("rhs_dilation")))
  if not pointwise:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  lhs = lhs[(slice(None),) + tuple(slice(None, None, s) for s in window_strides)]
  return pointwise_matmul(lhs, rhs.reshape(rhs.shape[-2:]), kwargs.get("precision"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_matmul(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
  """`x @ w` for `x: (..., Cin)`, `w: (Cin, Cout)`: a 1x1 convolution.

  Its weight gradient `x^T dy` contracts over every position, and XLA:CPU's matmul
  takes that operand transposed, a copy of a whole activation. Left to itself XLA
  transposes `dy`; this transposes the narrower of `x` and `dy` (e.g. the 64-channel
  input of a bottleneck's last conv rather than its 256-channel output), which
  made the ResNet-50 train step 9% faster (benchmarks/README.md).
  """
  return jnp.matmul(x, w, precision=precision)


def _pointwise_matmul_fwd(x, w, precision):
  return jnp.matmul(x, w, precision=precision), (x, w)


def _pointwise_matmul_bwd(precision, residuals, dy):
  x, w = residuals
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
  x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if x.shape[1] <= dy.shape[1]:
    dw = jnp.matmul(x.T, dy, precision=precision)
  else:
    dw = jnp.matmul(dy.T, x, precision=precision).T
  return dx, dw


pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)


def _pool_taps(x: jax.Array, size: int, stride: int, pad: int):
  """The `size * size` strided views of the -inf-padded x whose maximum is the pool."""
  h, w = x.shape[-3:-1]
  out_h, out_w = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)],
              constant_values=-jnp.inf)
  return [x[..., i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
          for i in range(size) for j in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, size: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Spatial max-pooling of `(..., H, W, C)` over `size x size` windows.

  The same values as `nn.max_pool(x, (size, size), (stride, stride), pad)`, with the
  gradient going to the first maximum of each window in row-major order (PyTorch's
  choice). The gradient is written by hand: XLA:CPU runs the generic one of
  `reduce_window` (a variadic reduction over index arrays, then a scatter) about
  10x slower than this one, which keeps the argmax of each window as an int8.

  Args:
    x: `(..., H, W, C)`.
    size: window side.
    stride: step between windows.
    pad: -inf padding on each side of H and W.

  Returns:
    `(..., H', W', C)` with `H' = (H + 2 pad - size) // stride + 1`, likewise W'.
  """
  return _max_pool_fwd(x, size, stride, pad)[0]


def _max_pool_fwd(x, size, stride, pad):
  taps = _pool_taps(x, size, stride, pad)
  out, argmax = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for index, tap in enumerate(taps[1:], start=1):
    larger = tap > out
    out = jnp.where(larger, tap, out)
    argmax = jnp.where(larger, jnp.int8(index), argmax)
  return out, (argmax, x.shape)


def _max_pool_bwd(size, stride, pad, residuals, grad):
  """Scatters each window's gradient to its argmax: one interior-padded add per tap."""
  argmax, shape = residuals
  padded_h, padded_w = shape[-3] + 2 * pad, shape[-2] + 2 * pad
  out_h, out_w = grad.shape[-3:-1]
  zero = jnp.zeros((), grad.dtype)
  dx = None
  for index in range(size * size):
    i, j = divmod(index, size)
    config = [(0, 0, 0)] * (grad.ndim - 3) + [
        (i, padded_h - i - stride * (out_h - 1) - 1, stride - 1),
        (j, padded_w - j - stride * (out_w - 1) - 1, stride - 1),
        (0, 0, 0)]
    tap_grad = jax.lax.pad(jnp.where(argmax == index, grad, zero), zero, config)
    dx = tap_grad if dx is None else dx + tap_grad
  return (dx[..., pad:padded_h - pad, pad:padded_w - pad, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
                   kernel_init=conv_kernel_init, conv_general_dilated=conv_or_matmul,
                   name="conv")(x)


def batch_norm(train: bool, dtype: Any, **kwargs) -> ModuleDef:
  """BatchNorm with PyTorch's defaults (momentum 0.1 in its terms, eps 1e-5)."""
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, dtype=dtype,
                           param_dtype=jnp.float32, **kwargs)


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
  """
  num_classes: int
  dropout_rate: float = 0.0
  frame_consensus: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    pool_axes = (2, 3) if self.frame_consensus else (1, 2, 3)
    x = jnp.mean(x, axis=pool_axes)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                 name="fc")(x)
    return jnp.mean(x, axis=1) if self.frame_consensus else x


class VideoResNet(nn.Module):
  """ResNet over clips `(B, T, H, W, 3)` -> logits `(B, num_classes)`.

  Attributes:
    stage_sizes: residual blocks per stage, e.g. `(3, 4, 6, 3)` for ResNet-50.
    num_classes: classifier outputs.
    num_frames: the clip length the model is built for; other lengths are refused.
    bottleneck: bottleneck blocks (50/101/152) or basic blocks (18/34).
    width: channels of the first stage (64 in the papers).
    small_stem: a 3x3 stride-1 stem without max-pool, for tiny inputs (32px).
    inflated_blocks: `(stage, block)` pairs whose first conv has kt=3 (3D stages).
    stem_temporal_kernel: kt of the stem conv (1 for 2D and SlowOnly; 5 for I3D).
    stem_temporal_stride: temporal stride of the stem conv.
    frame_consensus: TSN average consensus (2D) or clip pooling (3D).
    dropout_rate: dropout before the classifier.
    zero_init_residual: zero-initialise the last BN of each block.
    hooks: `((stage, block, position), factory)` pairs of temporal modules.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
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
  frame_consensus: bool = True
  dropout_rate: float = 0.0
  zero_init_residual: bool = False
  hooks: Tuple[Tuple[HookKey, Callable[..., nn.Module]], ...] = ()
  dtype: Any = jnp.float32

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

  @nn.compact
  def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
    self.check_input(video)
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
      x = max_pool(x, size=3, stride=2, pad=1)

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

    return ClassificationHead(self.num_classes, self.dropout_rate,
                              self.frame_consensus, name="head")(x, train=train)
