"""GTA: the Global Temporal Attention block (He et al., arXiv 2012.08510, BMVC 2021).

Only the paper's abstract could be read, so this is a reconstruction (see the GTA
section of DESIGN.md). The abstract fixes: temporal attention on top of spatial
attention, decoupled; a learned *global* T x T attention matrix, randomly
initialised and shared by all samples (not computed from q.k); cross-channel
multi-head; applied on pixels and on regions found by a learned transformation
matrix. Every other choice is a switch of `config.model.gta` (`docs/gta.md`).

On `x: (B, T, H, W, C)`, with `C' = C // reduction`, `N` heads of `d = C' / N`:

1. Spatial attention per frame (the 2D Non-local block's embedded Gaussian,
   scaled, :func:`gta_jax.models.baselines.embedded_gaussian`):
   `s = softmax(theta phi^T) v: (B, T, HW, C')` with the value `v = g(x)`.
2. The temporal step's input `u` (`temporal_input`): `s`, `s + v`, or `s + P x`
   with a projection `P` of its own.
3. Pixel branch: `y_h[:, t] = sum_t' A_h[t, t'] u_h[:, t']` at every pixel, with
   `u_h = u W_h` (`W_h: C' x d`, every channel feeds every head) and `A_h` the
   global matrix `G_h: (T, T)` (a parameter) normalised by `global_norm`: row
   softmax, softmax minus the identity (rows sum to 0, so a head can form
   differences of frames), or `G_h` itself (signed).
4. Region branch: `M = softmax_HW(x W_M): (B, T, HW, K)` soft-assigns pixels to `K`
   regions; region tokens `r = M^T u` get the same head-wise temporal attention
   (with their own `G`), and `M r'` brings them back to the pixels (with `M`'s rows
   normalised over the `K` regions when `region_norm`).
5. The branches are summed, projected to `C` by a 1x1 conv and batch-normalised
   with the BN scale initialised to `gate_init`, and added to `x`
   (:func:`gta_jax.models.hooks.residual_tail`). With `gate_init=0` the block is
   the identity at init, so it can go into an ImageNet-pretrained ResNet.

`G` has the shape `(N, T, T)` of the clip length at the block's stage: a model
built for one T refuses clips of another (a ValueError, never a broadcast).
"""

import functools
import math
from typing import Any, Dict, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gta_jax.models import baselines
from gta_jax.models import hooks

TEMPORAL_ATTENTIONS = ("global", "instance", "global+instance")
GRANULARITIES = ("pixel", "region", "both")
TEMPORAL_INPUTS = ("s", "s+v", "x+s")
GLOBAL_NORMS = ("softmax", "softmax-identity", "signed")
GLOBAL_INITS = ("random", "identity")
GLOBAL_LOGITS = "global_logits"  # the name of every G parameter


def normalize_global(logits: jax.Array, global_norm: str) -> jax.Array:
  """The attention `A` of `(..., T, T)` logits under `global_norm` (float32).

  `softmax`: rows are convex combinations of frames. `softmax-identity`:
  `softmax(G) - I`, rows sum to 0 (each output frame is a weighted average of the
  clip minus the frame itself). `signed`: `G` itself, unnormalised.
  """
  logits = logits.astype(jnp.float32)
  if global_norm == "signed":
    return logits
  weights = jax.nn.softmax(logits, axis=-1)
  if global_norm == "softmax-identity":
    weights -= jnp.eye(logits.shape[-1], dtype=jnp.float32)
  return weights


def global_init(std: float, kind: str, global_norm: str) -> nn.initializers.Initializer:
  """The initializer of `G: (N, T, T)`: normal with `std`, plus for `identity` a
  diagonal bias, `log T` on the logits of the softmax norms (the frame itself then
  takes about half of its row) and 1 for `signed` (`A` starts near `I`)."""
  def init(key, shape, dtype=jnp.float32):
    g = std * jax.random.normal(key, shape, dtype)
    if kind == "identity":
      t = shape[-1]
      bias = 1.0 if global_norm == "signed" else math.log(t)
      g += bias * jnp.eye(t, dtype=dtype)
    return g
  return init


def global_logits_param(module: nn.Module, init: nn.initializers.Initializer,
                        num_heads: int, num_frames: int) -> jax.Array:
  """`module`'s `(num_heads, T, T)` parameter named :data:`GLOBAL_LOGITS`.

  A `T x T` matrix is built for one clip length: a clip of another length is
  refused with a message that names the layer, not with a shape error.
  """
  if module.has_variable("params", GLOBAL_LOGITS):
    built_for = module.get_variable("params", GLOBAL_LOGITS).shape[-1]
    if built_for != num_frames:
      raise ValueError(
          f"{type(module).__name__} layer {'/'.join(module.path)} was built for "
          f"T={built_for} frames at its stage (its {built_for}x{built_for} matrix "
          f"over frames), got T={num_frames}: the model only takes clips of the "
          "length it was built for")
  return module.param(GLOBAL_LOGITS, init, (num_heads, num_frames, num_frames),
                      jnp.float32)


class HeadProjection(nn.Module):
  """A bias-free projection of `(..., C)` features to `(..., N, C / N)` heads.

  Attributes:
    num_heads: `N`.
    cross_channel: each head projects all `C` channels (kernel `(C, N, d)`);
      otherwise head `h` projects only its own slice of `d` channels (kernel
      `(N, d, d)`, a grouped 1x1 conv): the ablation of cross-channel heads.
    dtype: compute dtype.
  """
  num_heads: int
  cross_channel: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    d = c // self.num_heads
    if self.cross_channel:
      init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
      kernel = self.param("kernel", init, (c, self.num_heads, d), jnp.float32)
      return jnp.einsum("...c,chd->...hd", x, kernel.astype(self.dtype))
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
    kernel = self.param("kernel", init, (self.num_heads, d, d), jnp.float32)
    x = x.reshape(x.shape[:-1] + (self.num_heads, d))
    return jnp.einsum("...hc,hcd->...hd", x, kernel.astype(self.dtype))


class TemporalAttention(nn.Module):
  """Multi-head attention over T of tokens `(B, T, L, C)` -> `(B, T, L, C)`.

  Every one of the `L` tokens of a frame (pixels or regions) is mixed over time
  with the same `(N, T, T)` weights per clip.

  Attributes:
    num_heads: `N`; must divide `C`.
    mode: where the logits come from: `global` (a learned `(N, T, T)` parameter
      `G`), `instance` (scaled `q.k` of the frame features averaged over the `L`
      tokens; no positional encoding, so frame order is invisible) or
      `global+instance` (the sum of both logits).
    global_norm: how the logits become weights (:func:`normalize_global`);
      `signed` only with `mode='global'`.
    global_init: `random` or `identity` (:func:`global_init`).
    global_init_std: standard deviation of `G`'s normal init.
    cross_channel: see :class:`HeadProjection`.
    dtype: compute dtype; the weights are computed in float32.
  """
  num_heads: int = 8
  mode: str = "global"
  global_norm: str = "softmax"
  global_init: str = "random"
  global_init_std: float = 0.02
  cross_channel: bool = True
  dtype: Any = jnp.float32

  def global_logits(self, num_frames: int) -> jax.Array:
    """`G: (N, T, T)`, checking that the clip has the T it was built for."""
    init = global_init(self.global_init_std, self.global_init, self.global_norm)
    return global_logits_param(self, init, self.num_heads, num_frames)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t, l, c = tokens.shape
    if c % self.num_heads:
      raise ValueError(f"GTA: {c} channels cannot be split into {self.num_heads} "
                       "heads (config.model.gta.num_heads must divide the block's "
                       "channels // reduction)")
    project = functools.partial(HeadProjection, num_heads=self.num_heads,
                                cross_channel=self.cross_channel, dtype=self.dtype)
    logits = jnp.zeros((b, self.num_heads, t, t), jnp.float32)
    if self.mode in ("global", "global+instance"):
      logits += self.global_logits(t)
    if self.mode in ("instance", "global+instance"):
      pooled = jnp.mean(tokens, axis=2)  # (B, T, C)
      q = project(name="query")(pooled)
      k = project(name="key")(pooled)
      scale = (c // self.num_heads) ** -0.5
      logits += scale * jnp.einsum("bqhd,bkhd->bhqk", q, k,
                                   preferred_element_type=jnp.float32)
    weights = normalize_global(logits, self.global_norm).astype(self.dtype)
    values = project(name="value")(tokens)  # (B, T, L, N, d)
    out = jnp.einsum("bhts,bslhd->btlhd", weights, values)
    return out.reshape(b, t, l, c)


class GlobalTemporalAttention(nn.Module):
  """The GTA block on `(B, T, H, W, C)`, residual.

  Attributes:
    temporal_attention: `global`, `instance` or `global+instance` (see
      :class:`TemporalAttention`).
    granularity: `pixel`, `region` or `both` (the branches are summed).
    temporal_input: what the temporal step mixes: `s` (the spatial attention's
      output), `s+v` (plus its value `g(x)`, which keeps each pixel's own
      feature) or `x+s` (plus a 1x1 projection `skip` of `x` of its own).
    global_norm: `softmax`, `softmax-identity` or `signed` (see
      :func:`normalize_global`).
    global_init: `random` or `identity` (see :func:`global_init`).
    global_init_std: standard deviation of every `G` at init.
    gate_init: initial scale of the output BN (0: the identity at init).
    region_norm: normalise the scatter-back `M r'` over the `K` regions (each
      pixel takes a convex combination of the regions); otherwise `M`'s columns
      sum to 1 over the pixels and a pixel gets about `K / HW` of a region.
    num_heads: heads of the temporal attention; must divide `C // reduction`.
    num_regions: `K`, the learned soft regions of the region branch.
    reduction: `C' = C // reduction` channels in the attention; must divide `C`.
    cross_channel: each head projects all `C'` channels (else its own slice).
    pool_keys: the spatial step attends to 2x2 max-pooled keys and values (the
      Non-local paper's sub-sampling, :func:`baselines.embedded_gaussian`): a
      quarter of its cost; the value added by `s+v` keeps full resolution.
    dtype: compute dtype; parameters are float32, softmaxes run in float32.
  """
  temporal_attention: str = "global"
  granularity: str = "both"
  temporal_input: str = "s+v"
  global_norm: str = "softmax-identity"
  global_init: str = "random"
  global_init_std: float = 0.02
  gate_init: float = 0.0
  region_norm: bool = False
  num_heads: int = 8
  num_regions: int = 8
  reduction: int = 2
  cross_channel: bool = True
  pool_keys: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, t, h, w, c = x.shape
    if c % self.reduction:
      raise ValueError(f"GTA: reduction {self.reduction} does not divide the {c} "
                       f"channels of its input {x.shape} (config.model.gta.reduction)")
    inner = c // self.reduction
    temporal = functools.partial(
        TemporalAttention, num_heads=self.num_heads, mode=self.temporal_attention,
        global_norm=self.global_norm, global_init=self.global_init,
        global_init_std=self.global_init_std, cross_channel=self.cross_channel,
        dtype=self.dtype)

    # 1. Spatial attention within each frame; 2. the temporal step's input.
    s, v = baselines.embedded_gaussian(x, inner, kind="2d", scaled=True,
                                       dtype=self.dtype, pool_keys=self.pool_keys)
    if self.temporal_input == "s+v":
      s += v
    elif self.temporal_input == "x+s":
      s += nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    name="skip")(x)
    u = s.reshape(b, t, h * w, inner)

    # 3. and 4. Temporal attention on pixels and on regions.
    y = jnp.zeros_like(u)
    if self.granularity in ("pixel", "both"):
      y += temporal(name="pixel_temporal")(u)
    if self.granularity in ("region", "both"):
      # No bias: the softmax over positions would cancel it.
      logits = nn.Dense(self.num_regions, use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, name="region_logits")(x)
      assign = jax.nn.softmax(logits.reshape(b, t, h * w, self.num_regions)
                              .astype(jnp.float32), axis=2)
      regions = jnp.einsum("btpk,btpc->btkc", assign.astype(self.dtype), u)
      regions = temporal(name="region_temporal")(regions)
      if self.region_norm:
        assign /= jnp.sum(assign, axis=-1, keepdims=True)
      y += jnp.einsum("btpk,btkc->btpc", assign.astype(self.dtype), regions)

    # 5. Back to C channels, BN gate, residual.
    return hooks.residual_tail(x, y.reshape(b, t, h, w, inner), train=train,
                               dtype=self.dtype, gate_init=self.gate_init)


def global_attention_maps(variables: Mapping[str, Any], global_norm: str = "softmax"
                          ) -> Dict[str, jax.Array]:
  """The learned global temporal attention of every GTA layer of a model.

  Args:
    variables: the model's variables (a dict with a `params` collection).
    global_norm: the model's `config.model.gta.global_norm`.

  Returns:
    `{layer path: (heads, T, T)}`, `A = normalize_global(G)`: entry `[h, t, t']`
    is how much frame `t` takes from frame `t'` in head `h` (rows sum to 1 under
    `softmax`, to 0 under `softmax-identity`). Paths look like
    `res3_block0/post/pixel_temporal`.
  """
  if global_norm not in GLOBAL_NORMS:
    raise ValueError(f"global_norm must be one of {GLOBAL_NORMS}, got {global_norm!r}")
  flat = flax.traverse_util.flatten_dict(variables["params"])
  return {"/".join(path[:-1]): normalize_global(value, global_norm)
          for path, value in flat.items() if path[-1] == GLOBAL_LOGITS}


def _gta_config() -> ml_collections.ConfigDict:
  # The Non-local placement: every other block of res3 (2) and res4 (3).
  return ml_collections.ConfigDict(dict(
      placement="res3:0,2;res4:0,2,4", temporal_attention="global",
      granularity="both", temporal_input="s+v", global_norm="softmax-identity",
      global_init="random", global_init_std=0.02, gate_init=0.0, region_norm=False,
      num_heads=8, num_regions=8, reduction=2, cross_channel=True, pool_keys=False))


def _build_gta(cfg: ml_collections.ConfigDict, dtype: Any):
  """Checks `config.model.gta` and returns the block factory."""
  choices = dict(temporal_attention=TEMPORAL_ATTENTIONS, granularity=GRANULARITIES,
                 temporal_input=TEMPORAL_INPUTS, global_norm=GLOBAL_NORMS,
                 global_init=GLOBAL_INITS)
  for key, allowed in choices.items():
    if cfg[key] not in allowed:
      raise ValueError(f"config.model.gta.{key} must be one of {allowed}, got "
                       f"{cfg[key]!r}")
  if cfg.global_norm == "signed" and cfg.temporal_attention != "global":
    raise ValueError("config.model.gta.global_norm='signed' leaves the logits "
                     "unnormalised, which only makes sense for a learned matrix: "
                     "it needs temporal_attention='global', got "
                     f"{cfg.temporal_attention!r}")
  for key in ("num_heads", "num_regions", "reduction"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"config.model.gta.{key} must be a positive int, got "
                       f"{cfg[key]!r}")
  for key in ("global_init_std", "gate_init"):
    if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)):
      raise ValueError(f"config.model.gta.{key} must be a number, got {cfg[key]!r}")
  if cfg.global_init_std < 0:
    raise ValueError("config.model.gta.global_init_std must be a number >= 0, got "
                     f"{cfg.global_init_std!r}")
  for key in ("cross_channel", "region_norm", "pool_keys"):
    if not isinstance(cfg[key], bool):
      raise ValueError(f"config.model.gta.{key} must be True or False, got "
                       f"{cfg[key]!r}")
  return functools.partial(
      GlobalTemporalAttention, temporal_attention=cfg.temporal_attention,
      granularity=cfg.granularity, temporal_input=cfg.temporal_input,
      global_norm=cfg.global_norm, global_init=cfg.global_init,
      global_init_std=float(cfg.global_init_std), gate_init=float(cfg.gate_init),
      region_norm=cfg.region_norm, num_heads=cfg.num_heads,
      num_regions=cfg.num_regions, reduction=cfg.reduction,
      cross_channel=cfg.cross_channel, pool_keys=cfg.pool_keys, dtype=dtype)


GTA_SPEC = hooks.TemporalModuleSpec(
    position="post", default_config=_gta_config, build=_build_gta)
