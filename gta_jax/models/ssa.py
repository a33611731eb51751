"""SSA: the Separable Self-Attention of SSAN (Guo et al., CVPR 2021).

The module sits inside a bottleneck block, after its first 1x1 conv+BN+ReLU (the
`inner` hook), and its output replaces the feature on the residual branch; the
block's own shortcut stays. On `x: (B, T, H, W, C)`:

1. 1x1 convs give the query, key and value `q, k, v` (C -> C / reduction).
2. Spatial attention, per frame, two branches sharing q and k (Eq. 6):
   the position branch `M_S = softmax(q k^T)` (HW x HW) and the channel branch
   `M_C = softmax(q^T k)` (C x C); `x_hat = M_S v + v M_C^T`.
3. Temporal attention (Eq. 7): one 3x1x1 conv on `x_hat` gives `q_hat, k_hat`;
   each frame is flattened to a vector of H*W*C; `M_T = softmax(q_hat k_hat^T)`
   (T x T per clip).
4. Shared value embedding (Eq. 8): `y = M_T v`, with the spatial step's `v`.
   Not in the paper: `temporal_norm='softmax-identity'` gives `y = (M_T - I) v`
   (GTA's default normalisation of its global matrix), `'others-minus-self'`
   the same with `M_T`'s diagonal masked, so that each frame's output is the
   blend of the *other* frames minus the frame itself, and `'earlier-minus-self'`
   the blend of the *earlier* frames minus the frame (0 for the first frame).
   Also not in the paper: `temporal_cosine_scale > 0` makes `M_T`'s logits the
   cosine of two frames' `q_hat` and `k_hat` times a learned per-head scale
   (Swin Transformer V2), which, unlike the dot product, does not grow with the
   features' magnitude (docs/ssa.md, "The saturated M_T").

Every softmax goes through :func:`gta_jax.models.attention.attend` (f32 logits
and softmax under bf16). Two memory modes:

* Fast (`save_probs=True, spatial_chunk=0`; the default): every softmax is kept
  for the backward pass, which then needs no scores matmul and no `exp`.
* Lean (`save_probs=False, spatial_chunk=8`; the 16-frame configs): `attend`
  keeps no scores for the backward pass and recomputes them there, so the
  HW x HW scores (3136 x 3136 per frame where the module sees a 56x56 map) exist
  only while they are used, and `spatial_chunk` computes them a few frames at a
  time.

On a 2-core CPU the fast mode's SSA-R50 8f train step at 224px is 4-16% faster
(the two tie at 112px), and at 8 clips per step it needs 12.92 GiB against 11.36
(docs/ssa.md).

The paper has no scaling, residual or output projection; the switches in
:func:`default_config` add them for ablations. With a 1x1x1 temporal conv
(`temporal_kernel=1`) the module is equivariant to frame permutations, so a TSN
with it is blind to frame order like TSN itself; the 3x1x1 conv is what sees order.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gta_jax.models import attention
from gta_jax.models import backend
from gta_jax.models import gta
from gta_jax.models import hooks

SCALES = ("none", "sqrt_d")
PADDINGS = ("zeros", "edge")
TEMPORAL_NORMS = ("softmax", "softmax-identity", "others-minus-self", "earlier-minus-self")
# Swin Transformer V2's bound on its cosine attention's learned scale (1 / 0.01).
MAX_COSINE_SCALE = 100.0
# The `(B, heads, T, T)` weights `M_T` (masked as `temporal_norm` masks them), sown
# into the `intermediates` collection when it is mutable.
WEIGHTS = "temporal_weights"
_MASKED = -1e30  # a logit whose softmax weight is exactly 0
# The frames `s` that frame `t` may not attend to, as a (T, T) boolean [t, s].
_MASKED_FRAMES = {
    "others-minus-self": lambda t: jnp.eye(t, dtype=bool),
    "earlier-minus-self": lambda t: jnp.arange(t)[None, :] >= jnp.arange(t)[:, None],
}
# The two memory modes of `config.model.ssa` (module docstring, docs/ssa.md).
# Fast, the default: every softmax kept for the backward pass, all frames at once.
FAST_MEMORY_MODE = {"spatial_chunk": 0, "save_probs": True}
# Lean, for 16 frames: softmaxes recomputed, 8 frames at a time (8 frames of a
# 56x56 map are 8 x 3136^2 float32 scores, 315 MB, per buffer).
LEAN_MEMORY_MODE = {"spatial_chunk": 8, "save_probs": False}


def _scale(scale: str):
  """The `scale` argument of `attend`: 1.0 (unscaled) or None (1/sqrt(d))."""
  return 1.0 if scale == "none" else None


def spatial_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      channel_branch: bool, scale: str, save_probs: bool) -> jax.Array:
  """Eq. 6 on `(N, HW, C)` frames: `softmax(q k^T) v [+ v softmax(q^T k)^T]`."""
  out = attention.attend(q, k, v, scale=_scale(scale), save_probs=save_probs)
  if channel_branch:
    # Channels as tokens, positions as features: (N, C, HW). On CPU in float32:
    # XLA:CPU has no bf16 x bf16 -> f32 dot for this transposed layout, and the
    # C x C branch is cheap next to the HW x HW one.
    dtype = jnp.float32 if backend.current().use_cpu_kernels else q.dtype
    to_channels = lambda a: jnp.swapaxes(a, 1, 2).astype(dtype)
    out = out + to_channels(attention.attend(
        to_channels(q), to_channels(k), to_channels(v), scale=_scale(scale),
        save_probs=save_probs)
    ).astype(out.dtype)
  return out


def map_in_chunks(fn, chunk: int, *arrays: jax.Array) -> jax.Array:
  """`fn(*arrays)` computed `chunk` items of the leading axis at a time (`lax.map`).

  The leading axis is zero-padded to a multiple of `chunk` (zero rows attend
  uniformly, never NaN) and the padding is cut from the result. `chunk` 0, or at
  least the axis length, calls `fn` once.
  """
  n = arrays[0].shape[0]
  if not chunk or chunk >= n:
    return fn(*arrays)
  pad = -n % chunk
  arrays = tuple(
      jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])
      for a in arrays)
  out = jax.lax.map(lambda args: fn(*args), arrays)
  return out.reshape(-1, *out.shape[2:])[:n]


def bounded_cosine_scale(log_scale: jax.Array) -> jax.Array:
  """The scale of the cosine logits from its learned log, `temporal_log_scale`:
  `exp(log_scale)`, at most :data:`MAX_COSINE_SCALE`."""
  return jnp.exp(jnp.minimum(log_scale, math.log(MAX_COSINE_SCALE)))


def temporal_logits(q: jax.Array, k: jax.Array, *, scale: str, logit_cap: float = 0.0,
                    cosine_scale: Optional[jax.Array] = None) -> jax.Array:
  """The content logits of `M_T`, float32 `(B * N, T, T)`, of `(B * N, T, D)` clips
  of `N` heads: `q k^T` scaled by `scale`, or with `cosine_scale`, `(N,)`, the
  cosine of each pair of frames' `q` and `k` times the head's scale (`scale` is
  then unused); `logit_cap > 0` then bounds them to `cap * tanh(l / cap)`."""
  n, t, d = q.shape
  if cosine_scale is None:
    factor = 1.0 if scale == "none" else d ** -0.5
    logits = factor * jnp.einsum("bqd,bkd->bqk", q, k,
                                 preferred_element_type=jnp.float32)
  else:
    unit = lambda a: a * jax.lax.rsqrt(
        jnp.sum(jnp.square(a.astype(jnp.float32)), axis=-1, keepdims=True) + 1e-12)
    logits = jnp.einsum("bqd,bkd->bqk", unit(q), unit(k))
    logits = (logits.reshape(-1, cosine_scale.shape[0], t, t)
              * cosine_scale[:, None, None]).reshape(n, t, t)
  if logit_cap:
    logits = logit_cap * jnp.tanh(logits / logit_cap)
  return logits


def temporal_weights(q: jax.Array, k: jax.Array, *, scale: str,
                     bias: Optional[jax.Array] = None, logit_cap: float = 0.0,
                     cosine_scale: Optional[jax.Array] = None) -> jax.Array:
  """`M_T = softmax(logits [+ bias])`, float32 `(B * N, T, T)`, of `(B * N, T, D)`
  clips of `N` heads; the logits are :func:`temporal_logits`', and `bias`,
  `(N, T, T)` (or `(1, T, T)`, the same for every head), is added to each head's."""
  n, t, _ = q.shape
  logits = temporal_logits(q, k, scale=scale, logit_cap=logit_cap,
                           cosine_scale=cosine_scale)
  if bias is not None:
    logits = (logits.reshape(-1, *bias.shape) + bias).reshape(n, t, t)
  return jax.nn.softmax(logits, axis=-1)


def temporal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       scale: str, save_probs: bool,
                       bias: Optional[jax.Array] = None,
                       logit_cap: float = 0.0,
                       cosine_scale: Optional[jax.Array] = None) -> jax.Array:
  """Eqs. 7-8 on `(B * N, T, D)` clips of `N` heads: `M_T v`, `M_T` of
  :func:`temporal_weights`. Plain dot products without a bias go through `attend`;
  otherwise the T x T softmax, small, is written out in float32.
  """
  if bias is None and not logit_cap and cosine_scale is None:
    return attention.attend(q, k, v, scale=_scale(scale), save_probs=save_probs)
  weights = temporal_weights(q, k, scale=scale, bias=bias, logit_cap=logit_cap,
                             cosine_scale=cosine_scale)
  return jnp.einsum("bqk,bkd->bqd", weights.astype(v.dtype), v)


class SeparableSelfAttention(nn.Module):
  """SSA on `(B, T, H, W, C)`; returns the same shape (an `inner` hook module).

  Attributes:
    channel_branch: add the C x C channel branch to the HW x HW position branch.
    shared_value: the temporal step reuses the spatial value `v` (SVE, Eq. 8);
      otherwise the temporal conv also gives a value `v_hat` from `x_hat` (the
      sequential spatial-then-temporal reading).
    temporal_kernel: temporal size `kt` of the kt x 1 x 1 conv that gives
      `q_hat, k_hat` (3 in the paper; 1 is blind to frame order).
    temporal_padding: how that conv pads the clip's ends: `zeros` (the end frames
      see zeros, so they know where they are) or `edge` (repeats the end frames).
    scale: `none` (the paper) or `sqrt_d` (logits / sqrt of the dot length).
    residual: return `x + BN(y)` (:func:`hooks.residual_tail`); False returns `y`
      (the paper).
    gate_init: with `residual`, the BN scale's initial value (0: the module is
      the identity at init).
    reduction: q, k, v have `C // reduction` channels; above 1 a 1x1 conv maps
      `y` back to C channels.
    temporal_heads: the temporal step's heads (1 in the paper): head `n` forms
      its own `M_T` from its slice of `C // reduction // temporal_heads` channels
      and mixes only that slice of the value; must divide `C // reduction`.
    temporal_bias: add a learned `(temporal_heads, T, T)` matrix to the logits
      of `M_T` (not in the paper): GTA's global attention matrix `G`, a parameter
      of the same name, so that a head can attend by frame offset, which the
      content logits `q_hat k_hat^T` cannot choose (docs/ssa.md).
    temporal_bias_init_std: the normal init's std of that matrix.
    temporal_bias_init: `random` (normal) or `identity` (plus `log T` on the
      diagonal: each frame starts by giving itself about half its weight, as GTA's
      `global_init=identity`).
    temporal_norm: `softmax` (the paper: `y = M_T v`, a convex blend of the
      frames' values), `softmax-identity` (`y = (M_T - I) v`: the blend minus
      the frame's own value, a difference between frames, as GTA's default
      `global_norm`), `others-minus-self` (the same with `M_T`'s diagonal
      masked: a content attention weighs a frame's own value most, and
      `(M_T - I) v` then shrinks towards 0; docs/ssa.md) or `earlier-minus-self`
      (`M_T` masked to the frames before each frame: a difference with a
      direction in time; the first frame, with none before it, outputs 0). The
      last three are not in the paper.
    temporal_logit_cap: above 0, the content logits `l` of `M_T` become
      `cap * tanh(l / cap)` (not in the paper), so that no frame's weight can
      approach 1 and `(M_T - I) v` cannot vanish; 0: unbounded (docs/ssa.md).
    temporal_cosine_scale: above 0, the content logits of `M_T` are the cosine
      of two frames' `q_hat` and `k_hat` (each a head's H*W*C/heads numbers)
      times a learned per-head scale (`temporal_log_scale`, its log) that starts
      here and is kept at most :data:`MAX_COSINE_SCALE` (not in the paper; Swin
      Transformer V2's scaled cosine attention): the dot product's logits grow
      with the square of the features' magnitude and saturated `M_T` to one-hot
      rows in training (docs/ssa.md). 0: the dot product, scaled by `scale`.
    spatial_chunk: frames per step of the spatial attention (`lax.map` over
      chunks of the B*T frames), so that only that many HW x HW score matrices
      exist at once, in the forward and in the backward pass; 0: all frames.
    save_probs: keep every softmax (the HW x HW ones included) for the backward
      pass instead of recomputing it there (`attention.attend`): a faster
      backward pass, and `B * T * (HW)^2` more values stored. Meant with
      `spatial_chunk=0` (the config requires it): in the chunk loop the kept
      softmax is copied into a buffer for all frames, which made the step slower.
    dtype: compute dtype; parameters are float32.
  """
  channel_branch: bool = True
  shared_value: bool = True
  temporal_kernel: int = 3
  temporal_padding: str = "zeros"
  scale: str = "none"
  residual: bool = False
  gate_init: float = 0.0
  reduction: int = 1
  temporal_heads: int = 1
  temporal_bias: bool = False
  temporal_bias_init_std: float = 0.02
  temporal_bias_init: str = "random"
  temporal_norm: str = "softmax"
  temporal_logit_cap: float = 0.0
  temporal_cosine_scale: float = 0.0
  spatial_chunk: int = 0
  save_probs: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, t, h, w, c = x.shape
    if c % self.reduction:
      raise ValueError(f"SSA reduction {self.reduction} does not divide the "
                       f"{c} channels of its input {x.shape}")
    inner = c // self.reduction
    heads = self.temporal_heads
    if inner % heads:
      raise ValueError(f"SSA: temporal_heads {heads} does not divide the {inner} "
                       f"channels of q, k and v (input {x.shape}, reduction "
                       f"{self.reduction}; config.model.ssa.temporal_heads)")
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    q, k, v = (dense(inner, name=n)(x) for n in ("query", "key", "value"))

    spatial = functools.partial(spatial_attention,
                                channel_branch=self.channel_branch, scale=self.scale,
                                save_probs=self.save_probs)
    bias = None
    if self.temporal_bias:
      bias = gta.global_logits_param(
          self, gta.global_init(self.temporal_bias_init_std, self.temporal_bias_init,
                                "softmax"),
          heads, t)
    if self.temporal_norm in _MASKED_FRAMES:
      mask = jnp.where(_MASKED_FRAMES[self.temporal_norm](t), _MASKED, 0.0)
      bias = mask[None] if bias is None else bias + mask
    cosine_scale = None
    if self.temporal_cosine_scale:
      log_scale = self.param(
          "temporal_log_scale", nn.initializers.constant(
              math.log(self.temporal_cosine_scale)), (heads,), jnp.float32)
      cosine_scale = bounded_cosine_scale(log_scale)
    temporal = functools.partial(temporal_attention, scale=self.scale,
                                 save_probs=self.save_probs, bias=bias,
                                 logit_cap=self.temporal_logit_cap,
                                 cosine_scale=cosine_scale)

    frames = lambda a: a.reshape(b * t, h * w, a.shape[-1])
    x_hat = map_in_chunks(spatial, self.spatial_chunk, frames(q), frames(k), frames(v))
    x_hat = x_hat.reshape(b, t, h, w, inner)

    kt = self.temporal_kernel
    num_out = 2 if self.shared_value else 3
    pad = {"zeros": "constant", "edge": "edge"}[self.temporal_padding]
    x_hat = jnp.pad(x_hat, [(0, 0), (kt // 2, kt // 2), (0, 0), (0, 0), (0, 0)],
                    mode=pad)
    qkv_hat = nn.Conv(num_out * inner, (kt, 1, 1), padding="VALID",
                      dtype=self.dtype, param_dtype=jnp.float32,
                      name="temporal_conv")(x_hat)
    q_hat, k_hat, *v_hat = jnp.split(qkv_hat, num_out, axis=-1)
    value = v_hat[0] if v_hat else v

    # Each head's frames as vectors of H*W*(inner / heads): (B * heads, T, .).
    clips = lambda a: a.reshape(b, t, h * w, heads, inner // heads).transpose(
        0, 3, 1, 2, 4).reshape(b * heads, t, -1)
    y = temporal(clips(q_hat), clips(k_hat), clips(value))
    if self.temporal_norm != "softmax":
      y = y - clips(value)
    if self.temporal_norm == "earlier-minus-self":  # its first row is all masked
      y = y * (jnp.arange(t) > 0)[:, None]
    if self.is_mutable_collection("intermediates"):  # for pictures (gta_jax.visualize)
      weights = temporal_weights(clips(q_hat), clips(k_hat), scale=self.scale, bias=bias,
                                 logit_cap=self.temporal_logit_cap,
                                 cosine_scale=cosine_scale)
      self.sow("intermediates", WEIGHTS, weights.reshape(b, heads, t, t))
    y = y.reshape(b, heads, t, h * w, inner // heads).transpose(0, 2, 3, 1, 4)
    y = y.reshape(b, t, h, w, inner)
    if self.residual:
      return hooks.residual_tail(x, y, train=train, dtype=self.dtype,
                                 gate_init=self.gate_init, project=inner != c)
    if inner != c:
      y = dense(c, name="out")(y)
    return y


def default_config() -> ml_collections.ConfigDict:
  """`config.model.ssa`: the paper's module at the Non-local paper's places.

  The placement reads the paper's "2 in Res2 and 3 in Res3" as torchvision's
  layer2 blocks 0, 2 and layer3 blocks 0, 2, 4 (`res3`/`res4` here). The memory
  mode is the fast one (:data:`FAST_MEMORY_MODE`).
  """
  return ml_collections.ConfigDict(dict(
      placement="res3:0,2;res4:0,2,4", channel_branch=True, shared_value=True,
      temporal_kernel=3, temporal_padding="zeros", scale="none", residual=False,
      gate_init=0.0, reduction=1, temporal_heads=1, temporal_bias=False,
      temporal_bias_init_std=0.02, temporal_bias_init="random", temporal_norm="softmax",
      temporal_logit_cap=0.0, temporal_cosine_scale=0.0,
      **FAST_MEMORY_MODE))


def build(cfg: ml_collections.ConfigDict, dtype: Any):
  """`config.model.ssa` -> a factory of :class:`SeparableSelfAttention`."""
  if cfg.scale not in SCALES:
    raise ValueError(f"config.model.ssa.scale must be one of {SCALES}, "
                     f"got {cfg.scale!r}")
  if cfg.temporal_bias_init not in gta.GLOBAL_INITS:
    raise ValueError(f"config.model.ssa.temporal_bias_init must be one of "
                     f"{gta.GLOBAL_INITS}, got {cfg.temporal_bias_init!r}")
  if cfg.temporal_norm not in TEMPORAL_NORMS:
    raise ValueError(f"config.model.ssa.temporal_norm must be one of {TEMPORAL_NORMS}, "
                     f"got {cfg.temporal_norm!r}")
  if cfg.temporal_padding not in PADDINGS:
    raise ValueError(f"config.model.ssa.temporal_padding must be one of {PADDINGS}, "
                     f"got {cfg.temporal_padding!r}")
  if (not isinstance(cfg.temporal_kernel, int) or cfg.temporal_kernel < 1
      or cfg.temporal_kernel % 2 == 0):
    raise ValueError(f"config.model.ssa.temporal_kernel must be an odd int >= 1, "
                     f"got {cfg.temporal_kernel!r}")
  if isinstance(cfg.gate_init, bool) or not isinstance(cfg.gate_init, (int, float)):
    raise ValueError(f"config.model.ssa.gate_init must be a number, "
                     f"got {cfg.gate_init!r}")
  if not isinstance(cfg.reduction, int) or cfg.reduction < 1:
    raise ValueError(f"config.model.ssa.reduction must be a positive int, "
                     f"got {cfg.reduction!r}")
  if not isinstance(cfg.temporal_heads, int) or cfg.temporal_heads < 1:
    raise ValueError(f"config.model.ssa.temporal_heads must be a positive int, "
                     f"got {cfg.temporal_heads!r}")
  if not isinstance(cfg.spatial_chunk, int) or cfg.spatial_chunk < 0:
    raise ValueError(f"config.model.ssa.spatial_chunk must be an int >= 0, "
                     f"got {cfg.spatial_chunk!r}")
  for key in ("temporal_bias_init_std", "temporal_logit_cap", "temporal_cosine_scale"):
    if (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))
        or cfg[key] < 0):
      raise ValueError(f"config.model.ssa.{key} must be a number >= 0, "
                       f"got {cfg[key]!r}")
  for key in ("channel_branch", "shared_value", "residual", "temporal_bias",
              "save_probs"):
    if not isinstance(cfg[key], bool):
      raise ValueError(f"config.model.ssa.{key} must be True or False, "
                       f"got {cfg[key]!r}")
  if cfg.temporal_logit_cap and cfg.temporal_cosine_scale:
    raise ValueError(
        "config.model.ssa.temporal_logit_cap bounds dot-product logits; cosine logits "
        "(config.model.ssa.temporal_cosine_scale) are bounded by their scale: set one "
        f"of them to 0 (got {cfg.temporal_logit_cap} and {cfg.temporal_cosine_scale})")
  if cfg.save_probs and cfg.spatial_chunk:
    raise ValueError(
        "config.model.ssa.save_probs keeps every frame's softmax for the backward "
        "pass, so chunking the frames bounds no memory and only adds copies: set "
        f"config.model.ssa.spatial_chunk=0 with it (got {cfg.spatial_chunk})")
  return functools.partial(
      SeparableSelfAttention, channel_branch=cfg.channel_branch,
      shared_value=cfg.shared_value, temporal_kernel=cfg.temporal_kernel,
      temporal_padding=cfg.temporal_padding, scale=cfg.scale,
      residual=cfg.residual, gate_init=float(cfg.gate_init), reduction=cfg.reduction,
      temporal_heads=cfg.temporal_heads, temporal_bias=cfg.temporal_bias,
      temporal_bias_init_std=float(cfg.temporal_bias_init_std),
      temporal_bias_init=cfg.temporal_bias_init,
      temporal_norm=cfg.temporal_norm,
      temporal_logit_cap=float(cfg.temporal_logit_cap),
      temporal_cosine_scale=float(cfg.temporal_cosine_scale),
      spatial_chunk=cfg.spatial_chunk,
      save_probs=cfg.save_probs, dtype=dtype)


SSA_SPEC = hooks.TemporalModuleSpec(
    position="inner", default_config=default_config, build=build)
