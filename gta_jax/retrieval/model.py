"""The text-video retrieval model: a video network and a text encoder in one space.

Both sides end in a projection to `config.retrieval.embed_dim` with L2 normalisation,
so that a score is a cosine similarity:

* video: any network of the registry (TSN, TSM, GTA, SSA, Non-local, 2D or 3D)
  without its classifier, its pooled features `(B, C)`, trained end to end
  (`retrieval.video_encoder='finetune'`); or, `frozen`, those features computed once
  by the network with the weights of `config.init_from` / `config.model.pretrained`
  and cached (`retrieval.frozen`): the model then takes `(B, C)` features;
* text: word embeddings (learned, or started from a word-vector file) and an encoder
  over the words, `max` (HowTo100M: linear + ReLU per word, max over the words) or
  `transformer` (a small pre-LN transformer, mean over the words); or
  `precomputed` caption vectors (CLIP or any text model's, computed elsewhere);
* projection: HowTo100M's gated embedding unit (linear, context gating
  `x * sigmoid(W x + b)`, L2 normalisation; `gated`) or a linear map (`linear`).

`apply(variables, video, text, train)` gives `(video_emb (B, D), text_emb (B, D),
logit_scale)`; `method=RetrievalModel.embed_video` / `embed_text` give one side.
`text` is a dict: `tokens` int32 `(B, L)` and `token_mask` bool `(B, L)`, or
`vectors` `(B, D_text)` for precomputed vectors.
"""

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

TEXT_ENCODERS = ("max", "transformer", "precomputed")
PROJECTIONS = ("gated", "linear")
VIDEO_ENCODERS = ("finetune", "frozen")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class Projection(nn.Module):
  """A linear map to `dim`, optionally context-gated, then L2 normalisation."""
  dim: int
  gated: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.dim, name="fc")(x.astype(jnp.float32))
    if self.gated:
      x = x * nn.sigmoid(nn.Dense(self.dim, name="gate")(x))
    return l2_normalize(x)


class TransformerLayer(nn.Module):
  """A pre-LN transformer layer over words, padding masked out of the attention."""
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    attention_mask = nn.make_attention_mask(mask, mask)
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(
        y, y, mask=attention_mask)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
    return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))


class TextEncoder(nn.Module):
  """Captions -> `(B, hidden_dim)` (or the precomputed vectors as they are).

  Attributes:
    kind: one of `TEXT_ENCODERS`.
    vocab_size: rows of the word-embedding table (`text.Vocabulary`'s size bound).
    word_dim: word-embedding width (a word-vector file's dimension).
    hidden_dim: the encoder's width.
    max_words: the longest caption, in tokens (the transformer's positions).
    layers, heads: the transformer's.
  """
  kind: str
  vocab_size: int
  word_dim: int
  hidden_dim: int
  max_words: int
  layers: int = 2
  heads: int = 4

  @nn.compact
  def __call__(self, text: Dict[str, jax.Array], train: bool = False) -> jax.Array:
    del train
    if self.kind == "precomputed":
      return text["vectors"].astype(jnp.float32)
    mask = text["token_mask"]
    words = nn.Embed(self.vocab_size, self.word_dim, name="embed")(text["tokens"])
    h = nn.Dense(self.hidden_dim, name="word_fc")(words)
    if self.kind == "max":
      h = jnp.where(mask[..., None], nn.relu(h), -jnp.inf)
      return jnp.max(h, axis=1)
    h = h + self.param("positions", nn.initializers.normal(0.02),
                       (self.max_words, self.hidden_dim))[:h.shape[1]]
    for i in range(self.layers):
      h = TransformerLayer(self.heads, 2 * self.hidden_dim, name=f"layer{i}")(h, mask)
    h = nn.LayerNorm(name="ln")(h)
    weights = mask.astype(h.dtype)[..., None]
    return jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class Features(nn.Module):
  """The video side of a frozen encoder: its cached features `(B, C)`, as they are."""

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    return features.astype(jnp.float32)


class RetrievalModel(nn.Module):
  """Video and text encoders with their projections (see the module docstring).

  Attributes:
    video: the video network, `apply(video, train)` -> pooled features `(B, C)`.
    text: the :class:`TextEncoder`.
    embed_dim: the joint space's dimension.
    projection: one of `PROJECTIONS`.
    temperature_init: InfoNCE's initial temperature (`logit_scale` starts at
      its inverse; learned).
  """
  video: nn.Module
  text: nn.Module
  embed_dim: int
  projection: str = "gated"
  temperature_init: float = 0.07

  def setup(self):
    gated = self.projection == "gated"
    self.video_proj = Projection(self.embed_dim, gated)
    self.text_proj = Projection(self.embed_dim, gated)
    self.log_scale = self.param("logit_scale", nn.initializers.constant(
        -np.log(self.temperature_init)), ())

  def embed_video(self, video: jax.Array, train: bool = False) -> jax.Array:
    return self.video_proj(self.video(video, train=train))

  def embed_text(self, text: Dict[str, jax.Array], train: bool = False) -> jax.Array:
    return self.text_proj(self.text(text, train=train))

  def logit_scale(self) -> jax.Array:
    """InfoNCE's inverse temperature, at most 100 (as CLIP clips it)."""
    return jnp.minimum(jnp.exp(self.log_scale), 100.0)

  def __call__(self, video: jax.Array, text: Dict[str, jax.Array], train: bool = False
               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    return self.embed_video(video, train), self.embed_text(text, train), self.logit_scale()


def _choice(value: str, allowed, key: str) -> str:
  if value not in allowed:
    raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
  return value


def build_model(config: ml_collections.ConfigDict) -> RetrievalModel:
  """The retrieval model of a config with `task='retrieval'`.

  Raises:
    ValueError: naming the config key at fault.
  """
  from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
  t, r = config.text, config.retrieval
  kind = _choice(t.encoder, TEXT_ENCODERS, "config.text.encoder")
  _choice(r.projection, PROJECTIONS, "config.retrieval.projection")
  for key in ("vocab_size", "word_dim", "hidden_dim", "max_words", "layers", "heads"):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ValueError(f"config.text.{key} must be a positive int, got {t[key]!r}")
  if not isinstance(r.embed_dim, int) or r.embed_dim < 1:
    raise ValueError(f"config.retrieval.embed_dim must be a positive int, got "
                     f"{r.embed_dim!r}")
  if kind == "transformer" and t.hidden_dim % t.heads:
    raise ValueError(f"config.text.hidden_dim={t.hidden_dim} must divide by "
                     f"config.text.heads={t.heads}")
  text = TextEncoder(kind, t.vocab_size, t.word_dim, t.hidden_dim, t.max_words, t.layers,
                     t.heads)
  frozen = _choice(r.video_encoder, VIDEO_ENCODERS,
                   "config.retrieval.video_encoder") == "frozen"
  video = Features() if frozen else registry.build_video_network(config, 0)
  return RetrievalModel(video=video, text=text,
                        embed_dim=r.embed_dim, projection=r.projection,
                        temperature_init=r.temperature_init)


def is_frozen(config: ml_collections.ConfigDict) -> bool:
  """Whether the video side is a frozen network's cached features."""
  return config.retrieval.video_encoder == "frozen"


def feature_dim(config: ml_collections.ConfigDict) -> int:
  """The width of the video network's pooled features."""
  from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
  m = config.model
  return m.width * 8 * (4 if registry.DEPTHS[m.depth][1] else 1)


def example_video(config: ml_collections.ConfigDict, batch: int = 1) -> jax.Array:
  """A video-side input of the right shape (for `init`): clips, or frozen features."""
  from gta_jax.training import state  # pylint: disable=g-import-not-at-top
  if is_frozen(config):
    return jnp.zeros((batch, feature_dim(config)), jnp.float32)
  return jnp.zeros(state.input_shape(config, batch), jnp.float32)


def example_text(config: ml_collections.ConfigDict, batch: int = 1) -> Dict[str, Any]:
  """A text batch of the right shapes (for `init`)."""
  if config.text.encoder == "precomputed":
    return {"vectors": jnp.zeros((batch, config.text.vector_dim), jnp.float32)}
  return {"tokens": jnp.zeros((batch, config.text.max_words), jnp.int32),
          "token_mask": jnp.ones((batch, config.text.max_words), bool)}


def load_video_weights(video_variables, config: ml_collections.ConfigDict):
  """Host variables of the video network (no classifier) with the weights of
  `config.model.pretrained` (ImageNet) or `config.init_from` (a classification run,
  its classifier left out, or a retrieval run's video network)."""
  from gta_jax.training import finetune  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state  # pylint: disable=g-import-not-at-top
  if config.init_from and finetune.is_retrieval_run(config.init_from):
    run_config = config.copy_and_resolve_references()
    run_config.init_reinit = "|".join(filter(None, (config.init_reinit, "^(?!video/)")))
    merged = finetune.load_init_from(
        {k: {"video": v} for k, v in video_variables.items() if v}, run_config)
    return {k: merged[k]["video"] if k in merged else v for k, v in video_variables.items()}
  video_config = config.copy_and_resolve_references()
  video_config.task = "classification"
  video_config.init_reinit = "|".join(filter(None, (config.init_reinit, "^head/fc/")))
  return state.load_pretrained(video_variables, video_config)


def load_weights(variables, config: ml_collections.ConfigDict):
  """Host `variables` with the weights the config names: the video network's from
  `config.model.pretrained` (ImageNet) or `config.init_from` (a run of this project:
  a classification run's network, its classifier left out, or a retrieval run's whole
  model), and the word embeddings from `config.text.word_vectors`."""
  from gta_jax.retrieval import data  # pylint: disable=g-import-not-at-top
  from gta_jax.training import finetune  # pylint: disable=g-import-not-at-top
  if is_frozen(config):  # the network's weights went into the cached features
    return data.init_word_vectors(variables, config)
  video_only = bool(config.model.pretrained) or bool(
      config.init_from and not finetune.is_retrieval_run(config.init_from))
  if video_only:
    video = load_video_weights(
        {k: dict(variables[k]).get("video", {}) for k in ("params", "batch_stats")}, config)
    for k in ("params", "batch_stats"):
      if video[k]:
        variables[k] = dict(variables[k], video=video[k])
  elif config.init_from:
    variables = finetune.load_init_from(variables, config)
  return data.init_word_vectors(variables, config)
