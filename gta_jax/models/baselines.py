"""The baselines' temporal modules: TSM's shift and Non-local blocks.

* :func:`temporal_shift` / :class:`TemporalShift`: TSM (Lin et al., ICCV 2019).
  1/`fold_div` of the channels move one step back in time, 1/`fold_div` one step
  forward, the rest stay; zero padded at the clip ends. Placed on the residual branch
  before the block's first conv ("residual shift"). No parameters.
* :class:`NonLocal`: the embedded-Gaussian Non-local block (Wang et al., CVPR 2018),
  with its output BN's scale initialised to zero so the block is the identity at init.
  `kind` selects what attends to what: `3d` every position of the clip to every other,
  `2d` positions within a frame, `1d` the frames at one pixel, `2d+1d` a spatial block
  followed by a temporal one (SSAN's Table 2 baseline).

None of these can see frame order beyond what the shift gives: Non-local attention is
permutation-equivariant over T, so a TSN with Non-local blocks is still blind to a
reversed clip (tested).
"""

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gta_jax.models import attention
from gta_jax.models import hooks
from gta_jax.models import resnet

NONLOCAL_KINDS = ("3d", "2d", "1d", "2d+1d")


def temporal_shift(x: jax.Array, fold_div: int = 8) -> jax.Array:
  """Shifts channel groups along T of `(B, T, H, W, C)`, zero padded.

  Channels `[0, C/fold_div)` take the next frame's values (shift back in time),
  channels `[C/fold_div, 2C/fold_div)` the previous frame's; the rest are unchanged.
  """
  fold = x.shape[-1] // fold_div
  back, fwd, keep = x[..., :fold], x[..., fold:2 * fold], x[..., 2 * fold:]
  pad = [(0, 0)] * x.ndim
  back = jnp.pad(back[:, 1:], [(0, 0), (0, 1)] + pad[2:])
  fwd = jnp.pad(fwd[:, :-1], [(0, 0), (1, 0)] + pad[2:])
  return jnp.concatenate([back, fwd, keep], axis=-1)


class TemporalShift(nn.Module):
  """TSM's shift as a hook module (no parameters)."""
  fold_div: int = 8

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    return temporal_shift(x, self.fold_div)


def embedded_gaussian(x: jax.Array, inner: int, *, kind: str, scaled: bool,
                      dtype: Any, pool_keys: bool = False
                      ) -> Tuple[jax.Array, jax.Array]:
  """Embedded-Gaussian attention `softmax(theta(x) phi(x)^T) g(x)` on `(B, T, H, W, C)`.

  Called inside a module's compact method, it creates that module's 1x1 convs
  `theta`, `phi` (no bias: the softmax over keys cancels it) and `g`, all
  `C -> inner`. Shared by :class:`NonLocal` and GTA's spatial step.

  Args:
    x: `(B, T, H, W, C)`.
    inner: channels of the embeddings.
    kind: which positions attend to each other: `3d` (the whole clip), `2d` (a
      frame) or `1d` (a pixel's frames).
    scaled: divide the logits by `sqrt(inner)`.
    dtype: compute dtype; parameters are float32.
    pool_keys: max-pool `phi(x)` and `g(x)` over 2x2 windows of space before the
      attention (the Non-local paper's sub-sampling): 4x fewer keys, every query
      kept. An odd H or W drops its last row or column of keys, as PyTorch's
      `MaxPool2d(2)` in the Non-local reference does. For `2d` and `3d`.

  Returns:
    The attention's output and the value `g(x)` (never pooled), both
    `(B, T, H, W, inner)`.
  """
  b, t, h, w, _ = x.shape
  dense = functools.partial(nn.Dense, inner, dtype=dtype, param_dtype=jnp.float32)
  theta, g = dense(name="theta")(x), dense(name="g")(x)
  phi = dense(use_bias=False, name="phi")(x)
  keys, values = phi, g
  if pool_keys:
    keys, values = (resnet.max_pool(y, size=2, stride=2, pad=0) for y in (phi, g))
  if kind == "3d":
    to_tokens = lambda y: y.reshape(b, -1, inner)
  elif kind == "2d":
    to_tokens = lambda y: y.reshape(b * t, -1, inner)
  elif kind == "1d":
    to_tokens = lambda y: y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, inner)
  else:
    raise ValueError(f"NonLocal kind must be one of {NONLOCAL_KINDS[:3]}, "
                     f"got {kind!r}")
  y = attention.attend(to_tokens(theta), to_tokens(keys), to_tokens(values),
                       scale=None if scaled else 1.0)
  if kind == "1d":
    y = y.reshape(b, h, w, t, inner).transpose(0, 3, 1, 2, 4)
  return y.reshape(b, t, h, w, inner), g


class NonLocal(nn.Module):
  """Embedded-Gaussian Non-local block on `(B, T, H, W, C)`, residual.

  `y = x + BN(W_z softmax(theta(x) phi(x)^T) g(x))` with 1x1x1 projections to
  `C // reduction` channels, the softmax over the positions `kind` selects, and the
  BN's scale initialised to zero (:func:`hooks.residual_tail`).

  Attributes:
    kind: `3d` (space-time), `2d` (space, per frame) or `1d` (time, per pixel).
    reduction: channel reduction of the embeddings (2 in the paper).
    scaled: divide the logits by sqrt(C') (off in the paper).
    dtype: compute dtype.
  """
  kind: str = "3d"
  reduction: int = 2
  scaled: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y, _ = embedded_gaussian(x, x.shape[-1] // self.reduction, kind=self.kind,
                             scaled=self.scaled, dtype=self.dtype)
    return hooks.residual_tail(x, y, train=train, dtype=self.dtype)


class NonLocal2D1D(nn.Module):
  """A spatial Non-local block followed by a temporal one (SSAN's 2D+1D baseline)."""
  reduction: int = 2
  scaled: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for kind in ("2d", "1d"):
      x = NonLocal(kind=kind, reduction=self.reduction, scaled=self.scaled,
                   dtype=self.dtype, name=f"nonlocal_{kind}")(x, train=train)
    return x


def _tsm_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(placement="all", fold_div=8))


def _nonlocal_config() -> ml_collections.ConfigDict:
  # The Non-local paper's placement: 5 blocks, every other block of res3 and res4.
  return ml_collections.ConfigDict(dict(
      placement="res3:0,2;res4:0,2,4", kind="3d", reduction=2, scaled=False))


def _build_nonlocal(cfg: ml_collections.ConfigDict, dtype: Any):
  if cfg.kind not in NONLOCAL_KINDS:
    raise ValueError(f"config.model.nl.kind must be one of {NONLOCAL_KINDS}, "
                     f"got {cfg.kind!r}")
  if cfg.kind == "2d+1d":
    return functools.partial(NonLocal2D1D, reduction=cfg.reduction,
                             scaled=cfg.scaled, dtype=dtype)
  return functools.partial(NonLocal, kind=cfg.kind, reduction=cfg.reduction,
                           scaled=cfg.scaled, dtype=dtype)


TSM_SPEC = hooks.TemporalModuleSpec(
    position="pre", default_config=_tsm_config,
    build=lambda cfg, dtype: functools.partial(TemporalShift, fold_div=cfg.fold_div))

NONLOCAL_SPEC = hooks.TemporalModuleSpec(
    position="post", default_config=_nonlocal_config, build=_build_nonlocal)
