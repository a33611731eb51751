"""Kernels with hand-written gradients for XLA:CPU, used on CPU only.

XLA:CPU runs a few of a ResNet's gradients far below its matmul rate: the
weight gradient of a 1x1 convolution, and the generic gradient of a max-pool
(`reduce_window`). On CPU, `gta_jax.models.resnet` takes these instead
(`gta_jax.models.backend`; `config.model.cpu_kernels=False` turns them off);
on GPU and TPU it uses `lax.conv_general_dilated` and `flax.linen.max_pool`.
Same values, same parameters; the gradients are equal to the generic ones (the
max-pool's to the first maximum of each window, as PyTorch's).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp


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
