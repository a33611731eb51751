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

As released, a Non-local block is blind to frame order: its attention is
permutation-equivariant over T, so a TSN with Non-local blocks cannot tell a clip
from its reverse (tested). `temporal_position` adds a temporal position encoding to
the queries and keys, which makes the 3D block a joint space-time attention that
can see order (docs/baselines.md).
"""

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gta_jax.models import attention
from gta_jax.models import hooks
from gta_jax.models import resnet

NONLOCAL_KINDS = ("3d", "2d", "1d", "2d+1d")
TEMPORAL_POSITIONS = ("none", "learned", "sinusoidal")


def check_temporal_position(temporal_position: str, kind: str) -> None:
  """Raises a ValueError naming `config.model.nl.temporal_position` if it is unknown
  or asks for positions where the keys come from one frame (kind '2d')."""
  if temporal_position not in TEMPORAL_POSITIONS:
    raise ValueError(f"config.model.nl.temporal_position must be one of "
                     f"{TEMPORAL_POSITIONS}, got {temporal_position!r}")
  if temporal_position != "none" and kind == "2d":
    raise ValueError("config.model.nl.temporal_position needs keys from several "
                     "frames: kind '3d', '1d' or '2d+1d', got '2d'")


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
                      dtype: Any, pool_keys: bool = False,
                      position: Optional[jax.Array] = None
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
      attention (the Non-local paper's sub-sampling; mmcv's `sub_sample=True`,
      which pools after the projections as here): 4x fewer keys, every query
      kept. An odd H or W drops its last row or column of keys, as PyTorch's
      `MaxPool2d(2)` / `MaxPool3d((1, 2, 2))` do. For `2d` and `3d`: `1d` has no
      spatial keys.
    position: `(T, C)`, added to the input of `theta` and `phi` (queries and
      keys), not of `g`; `None`: no position.

  Returns:
    The attention's output and the value `g(x)` (never pooled), both
    `(B, T, H, W, inner)`.

  Raises:
    ValueError: for an unknown `kind`, or `pool_keys` with `kind='1d'`.
  """
  b, t, h, w, _ = x.shape
  if kind not in NONLOCAL_KINDS[:3]:
    raise ValueError(f"NonLocal kind must be one of {NONLOCAL_KINDS[:3]}, "
                     f"got {kind!r}")
  if pool_keys and kind == "1d":
    raise ValueError("pool_keys pools space; a 1d attention's keys are frames")
  dense = functools.partial(nn.Dense, inner, dtype=dtype, param_dtype=jnp.float32)
  x_qk = x if position is None else x + position[:, None, None, :].astype(x.dtype)
  theta, g = dense(name="theta")(x_qk), dense(name="g")(x)
  phi = dense(use_bias=False, name="phi")(x_qk)
  keys, values = phi, g
  if pool_keys:
    keys, values = (resnet.max_pool(y, size=2, stride=2, pad=0) for y in (phi, g))
  if kind == "3d":
    to_tokens = lambda y: y.reshape(b, -1, inner)
  elif kind == "2d":
    to_tokens = lambda y: y.reshape(b * t, -1, inner)
  else:
    to_tokens = lambda y: y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, inner)
  y = attention.attend(to_tokens(theta), to_tokens(keys), to_tokens(values),
                       scale=None if scaled else 1.0)
  if kind == "1d":
    y = y.reshape(b, h, w, t, inner).transpose(0, 3, 1, 2, 4)
  return y.reshape(b, t, h, w, inner), g


def sinusoidal_table(length: int, channels: int) -> jax.Array:
  """The Transformer's position table (Vaswani et al. 2017), `(length, channels)`.

  Entry `[t, 2i]` is `sin(t / 10000^(2i / channels))` and `[t, 2i + 1]` the cosine
  of the same angle (an odd `channels` ends with a sine).
  """
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] / 10000.0**(
      jnp.arange(0, channels, 2, dtype=jnp.float32) / channels)
  table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return table.reshape(length, -1)[:, :channels]


class NonLocal(nn.Module):
  """Embedded-Gaussian Non-local block on `(B, T, H, W, C)`, residual.

  `y = x + BN(W_z softmax(theta(x) phi(x)^T) g(x))` with 1x1x1 projections to
  `C // reduction` channels, the softmax over the positions `kind` selects, and the
  BN's scale initialised to zero (:func:`hooks.residual_tail`).

  The defaults are the block of mmaction2's released TSM and I3D Non-local configs
  (`NonLocal3d(sub_sample=True, use_scale=False, mode='embedded_gaussian')`).
  Scaling differs between the sources: mmaction2's TSM and I3D Non-local configs
  set `use_scale=False` (its SlowOnly Non-local configs `True`; mmcv's own default
  is `True`), and the original video-nonlocal-net code scales (`USE_SCALE: True`
  in its config defaults and in every released config). Sub-sampling is in both:
  mmcv max-pools `phi(x)` and `g(x)` after their projections (as here),
  video-nonlocal-net (`USE_MAXPOOL: True`) max-pools `x` before them, which is
  another function of the same weights.

  Attributes:
    kind: `3d` (space-time), `2d` (space, per frame) or `1d` (time, per pixel).
    reduction: channel reduction of the embeddings (2 in the paper).
    scaled: divide the logits by sqrt(C').
    sub_sample: attend to 2x2 max-pooled keys and values (`phi`, `g`), mmcv's
      `MaxPool3d((1, 2, 2))` / `MaxPool2d(2)`; every query is kept. It pools space
      only, like the 3D window, so a `1d` block (keys: a pixel's frames) is not
      sub-sampled.
    temporal_position: `none` (the released block), `learned` (a `(T, C)`
      table, normal init with std 0.02) or `sinusoidal` (the Transformer's
      table, no parameters). The encoding of each frame is added to the block's
      input of `theta` and `phi`, so it enters the attention logits, not the
      values: `(theta(x_i + p_t)) . (phi(x_j + p_t'))` holds a term of
      `(t, t')` alone, a learned `T x T` bias of the logits like GTA's global
      matrix, and content-time terms, while what is mixed, `g(x)`, stays the
      content, as in GTA's temporal step. For `3d` and `1d` (keys from several
      frames); a `2d` block's keys share the query's frame.
    dtype: compute dtype.
  """
  kind: str = "3d"
  reduction: int = 2
  scaled: bool = False
  sub_sample: bool = True
  temporal_position: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _, t, _, _, c = x.shape
    check_temporal_position(self.temporal_position, self.kind)
    position = None
    if self.temporal_position == "learned":
      position = self.param("temporal_position", nn.initializers.normal(0.02),
                            (t, c), jnp.float32)
    elif self.temporal_position == "sinusoidal":
      position = sinusoidal_table(t, c)
    y, _ = embedded_gaussian(x, c // self.reduction, kind=self.kind,
                             scaled=self.scaled, dtype=self.dtype,
                             pool_keys=self.sub_sample and self.kind != "1d",
                             position=position)
    return hooks.residual_tail(x, y, train=train, dtype=self.dtype)


class NonLocal2D1D(nn.Module):
  """A spatial Non-local block followed by a temporal one (SSAN's 2D+1D baseline).

  `sub_sample` applies to the spatial block, `temporal_position` to the temporal
  one (see :class:`NonLocal`).
  """
  reduction: int = 2
  scaled: bool = False
  sub_sample: bool = True
  temporal_position: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block = functools.partial(NonLocal, reduction=self.reduction, scaled=self.scaled,
                              sub_sample=self.sub_sample, dtype=self.dtype)
    x = block(kind="2d", name="nonlocal_2d")(x, train=train)
    return block(kind="1d", temporal_position=self.temporal_position,
                 name="nonlocal_1d")(x, train=train)


def _tsm_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(placement="all", fold_div=8))


def _nonlocal_config() -> ml_collections.ConfigDict:
  # The Non-local paper's placement: 5 blocks, every other block of res3 and res4;
  # the block of mmaction2's TSM/I3D Non-local configs (see `NonLocal`).
  return ml_collections.ConfigDict(dict(
      placement="res3:0,2;res4:0,2,4", kind="3d", reduction=2, scaled=False,
      sub_sample=True, temporal_position="none"))


def _build_nonlocal(cfg: ml_collections.ConfigDict, dtype: Any):
  """Checks `config.model.nl` and returns the block factory."""
  if cfg.kind not in NONLOCAL_KINDS:
    raise ValueError(f"config.model.nl.kind must be one of {NONLOCAL_KINDS}, "
                     f"got {cfg.kind!r}")
  check_temporal_position(cfg.temporal_position, cfg.kind)
  for key in ("scaled", "sub_sample"):
    if not isinstance(cfg[key], bool):
      raise ValueError(f"config.model.nl.{key} must be True or False, got "
                       f"{cfg[key]!r}")
  common = dict(reduction=cfg.reduction, scaled=cfg.scaled, sub_sample=cfg.sub_sample,
                temporal_position=cfg.temporal_position, dtype=dtype)
  if cfg.kind == "2d+1d":
    return functools.partial(NonLocal2D1D, **common)
  return functools.partial(NonLocal, kind=cfg.kind, **common)


TSM_SPEC = hooks.TemporalModuleSpec(
    position="pre", default_config=_tsm_config,
    build=lambda cfg, dtype: functools.partial(TemporalShift, fold_div=cfg.fold_div))

NONLOCAL_SPEC = hooks.TemporalModuleSpec(
    position="post", default_config=_nonlocal_config, build=_build_nonlocal)
