"""GTA: the Global Temporal Attention block (He et al., arXiv 2012.08510, BMVC 2021).

Only the paper's abstract could be read, so this is a reconstruction (see the GTA
section of DESIGN.md). The abstract fixes: temporal attention on top of spatial
attention, decoupled; a learned *global* T x T attention matrix, randomly
initialised and shared by all samples (not computed from q.k); cross-channel
multi-head; applied on pixels and on regions found by a learned transformation
matrix. Every other choice is a switch of `config.model.gta` (`docs/gta.md`).

On `x: (B, T, H, W, C)`, with `C' = C // reduction`, `N` heads of `d = C' / N`:

1. Spatial attention per frame (embedded Gaussian, scaled dot product over the
   H*W positions, through `gta_jax.models.attention.attend`): `s: (B, T, HW, C')`.
2. Pixel branch: `y_h[:, t] = sum_t' A_h[t, t'] v_h[:, t']` at every pixel, with
   `v_h = s W_h` (`W_h: C' x d`, every channel feeds every head) and
   `A_h = softmax(G_h)`, `G_h: (T, T)` a parameter.
3. Region branch: `M = softmax_HW(x W_M): (B, T, HW, K)` soft-assigns pixels to `K`
   regions; region tokens `r = M^T s` get the same head-wise temporal attention
   (with their own `G`), and `M r'` brings them back to the pixels.
4. The branches are summed, projected to `C` by a 1x1 conv, batch-normalised with
   the BN scale initialised to zero, and added to `x`: the block is the identity
   at init, so it can go into an ImageNet-pretrained ResNet.

`G` has the shape `(N, T, T)` of the clip length at the block's stage: a model
built for one T refuses clips of another (a ValueError, never a broadcast).
"""

import functools
from typing import Any, Dict, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gta_jax.models import attention
from gta_jax.models import hooks
from gta_jax.models import resnet

TEMPORAL_ATTENTIONS = ("global", "instance", "global+instance")
GRANULARITIES = ("pixel", "region", "both")
GLOBAL_LOGITS = "global_logits"  # the name of every G parameter


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
      `G`, normal init), `instance` (scaled `q.k` of the frame features averaged
      over the `L` tokens; no positional encoding, so frame order is invisible)
      or `global+instance` (the sum of both logits).
    cross_channel: see :class:`HeadProjection`.
    global_init_std: standard deviation of `G` at init.
    dtype: compute dtype; the softmax runs in float32.
  """
  num_heads: int = 8
  mode: str = "global"
  cross_channel: bool = True
  global_init_std: float = 0.02
  dtype: Any = jnp.float32

  def global_logits(self, num_frames: int) -> jax.Array:
    """`G: (N, T, T)`, checking that the clip has the T it was built for."""
    if self.has_variable("params", GLOBAL_LOGITS):
      built_for = self.get_variable("params", GLOBAL_LOGITS).shape[-1]
      if built_for != num_frames:
        raise ValueError(
            f"GTA layer {'/'.join(self.path)} was built for T={built_for} frames at "
            f"its stage (its global {built_for}x{built_for} attention matrix), got "
            f"T={num_frames}: a GTA model only takes clips of the length it was "
            "built for")
    return self.param(GLOBAL_LOGITS, nn.initializers.normal(self.global_init_std),
                      (self.num_heads, num_frames, num_frames), jnp.float32)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t, l, c = tokens.shape
    if self.mode not in TEMPORAL_ATTENTIONS:
      raise ValueError(f"temporal attention mode must be one of "
                       f"{TEMPORAL_ATTENTIONS}, got {self.mode!r}")
    if c % self.num_heads:
      raise ValueError(f"GTA: {c} channels cannot be split into {self.num_heads} "
                       "heads (config.model.gta.num_heads must divide the block's "
                       "channels // reduction)")
    project = functools.partial(HeadProjection, self.num_heads, self.cross_channel,
                                self.dtype)
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
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    values = project(name="value")(tokens)  # (B, T, L, N, d)
    out = jnp.einsum("bhts,bslhd->btlhd", weights, values)
    return out.reshape(b, t, l, c)


class GlobalTemporalAttention(nn.Module):
  """The GTA block on `(B, T, H, W, C)`, residual; the identity at init.

  Attributes:
    temporal_attention: `global`, `instance` or `global+instance` (see
      :class:`TemporalAttention`).
    granularity: `pixel`, `region` or `both` (the branches are summed).
    num_heads: heads of the temporal attention; must divide `C // reduction`.
    num_regions: `K`, the learned soft regions of the region branch.
    reduction: `C' = C // reduction` channels in the attention.
    cross_channel: each head projects all `C'` channels (else its own slice).
    global_init_std: standard deviation of every `G` at init.
    dtype: compute dtype; parameters are float32, softmaxes run in float32.
  """
  temporal_attention: str = "global"
  granularity: str = "both"
  num_heads: int = 8
  num_regions: int = 8
  reduction: int = 2
  cross_channel: bool = True
  global_init_std: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"GTA granularity must be one of {GRANULARITIES}, got "
                       f"{self.granularity!r}")
    b, t, h, w, c = x.shape
    inner = c // self.reduction
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    temporal = functools.partial(TemporalAttention, self.num_heads,
                                 self.temporal_attention, self.cross_channel,
                                 self.global_init_std, self.dtype)
    tokens = lambda y: y.reshape(b * t, h * w, y.shape[-1])

    # 1. Spatial attention within each frame.
    q, k, v = (tokens(dense(inner, name=n)(x)) for n in ("theta", "phi", "g"))
    s = attention.attend(q, k, v).reshape(b, t, h * w, inner)

    # 2. and 3. Temporal attention on pixels and on regions.
    y = jnp.zeros_like(s)
    if self.granularity in ("pixel", "both"):
      y += temporal(name="pixel_temporal")(s)
    if self.granularity in ("region", "both"):
      logits = dense(self.num_regions, name="region_logits")(x)
      assign = jax.nn.softmax(logits.reshape(b, t, h * w, self.num_regions)
                              .astype(jnp.float32), axis=2).astype(self.dtype)
      regions = jnp.einsum("btpk,btpc->btkc", assign, s)
      regions = temporal(name="region_temporal")(regions)
      y += jnp.einsum("btpk,btkc->btpc", assign, regions)

    # 4. Back to C channels, zero-init BN, residual.
    y = dense(c, name="out")(y.reshape(b, t, h, w, inner))
    y = resnet.batch_norm(train, self.dtype, scale_init=nn.initializers.zeros)(
        name="bn")(y)
    return x + y


def global_attention_maps(variables: Mapping[str, Any]) -> Dict[str, jax.Array]:
  """The learned global temporal attention of every GTA layer of a model.

  Args:
    variables: the model's variables (a dict with a `params` collection).

  Returns:
    `{layer path: (heads, T, T)}`, each row softmax-normalised: entry `[h, t, t']`
    is how much frame `t` takes from frame `t'` in head `h`. Paths look like
    `res3_block0/post/pixel_temporal`.
  """
  flat = flax.traverse_util.flatten_dict(variables["params"])
  return {"/".join(path[:-1]): jax.nn.softmax(value, axis=-1)
          for path, value in flat.items() if path[-1] == GLOBAL_LOGITS}


def _gta_config() -> ml_collections.ConfigDict:
  # The Non-local placement: every other block of res3 (2) and res4 (3).
  return ml_collections.ConfigDict(dict(
      placement="res3:0,2;res4:0,2,4", temporal_attention="global",
      granularity="both", num_heads=8, num_regions=8, reduction=2,
      cross_channel=True, global_init_std=0.02))


def _build_gta(cfg: ml_collections.ConfigDict, dtype: Any):
  """Checks `config.model.gta` and returns the block factory."""
  choices = dict(temporal_attention=TEMPORAL_ATTENTIONS, granularity=GRANULARITIES)
  for key, allowed in choices.items():
    if cfg[key] not in allowed:
      raise ValueError(f"config.model.gta.{key} must be one of {allowed}, got "
                       f"{cfg[key]!r}")
  for key in ("num_heads", "num_regions", "reduction"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"config.model.gta.{key} must be a positive int, got "
                       f"{cfg[key]!r}")
  if not isinstance(cfg.global_init_std, (int, float)) or cfg.global_init_std < 0:
    raise ValueError("config.model.gta.global_init_std must be a number >= 0, got "
                     f"{cfg.global_init_std!r}")
  return functools.partial(
      GlobalTemporalAttention, cfg.temporal_attention, cfg.granularity,
      cfg.num_heads, cfg.num_regions, cfg.reduction, bool(cfg.cross_channel),
      float(cfg.global_init_std), dtype)


GTA_SPEC = hooks.TemporalModuleSpec(
    position="post", default_config=_gta_config, build=_build_gta)
