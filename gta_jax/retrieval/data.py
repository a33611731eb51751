"""The text side of the data: captions of a prepared split, the vocabulary, and batches.

* :func:`read_captions`: a prepared captioned split's captions per video, from its
  `captions.json` (no frame is read).
* :func:`vocabulary`: the word vocabulary of the training captions. `train.py` saves
  it in the run (`WORKDIR/vocab.json`) and every later reader of the run takes that
  copy, so that a checkpoint always meets the vocabulary it was trained with.
* :class:`CaptionEncoder`: captions -> the text fields of a batch (`tokens` and
  `token_mask`, or precomputed `vectors`); picklable, it runs in the input workers.
* :func:`array_loader`: every caption (or cached feature) of a split once, in batches
  split across processes like `pipeline.make_eval_loader`'s videos (with `mask` and
  `video_index`, here the row's index).
* :func:`video_features`: a frozen video network's features, computed once and cached
  in the run (`WORKDIR/video_features/<split>.npz`), and :func:`make_train_loader`,
  which trains on them (or on clips).
"""

from __future__ import annotations

import io
import json
from typing import Optional, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from gta_jax import paths
from gta_jax.data import builders
from gta_jax.data import pipeline
from gta_jax.data.builders import base
from gta_jax.retrieval import text as text_lib

VOCAB_FILE = "vocab.json"
FEATURES_DIR = "video_features"  # a frozen video network's cached features


def read_captions(config: ml_collections.ConfigDict, split: str) -> list[list[str]]:
  """The captions of each video of a prepared split, in the data source's order.

  Raises:
    ValueError: the dataset has no captions, or no such split.
  """
  prepared = paths.path(builders.prepared_dir(config.data))
  file = prepared / base.CAPTIONS_FILE
  if not file.exists():
    raise ValueError(f"dataset {config.data.dataset!r} ({prepared}) has no "
                     f"{base.CAPTIONS_FILE}: retrieval needs a prepared captioned dataset "
                     "(synthetic_captions, captioned_folder, msrvtt, youcook2)")
  captions = json.loads(file.read_text())
  if split not in captions:
    raise ValueError(f"dataset {config.data.dataset!r} ({prepared}) has no split "
                     f"{split!r}; its splits are {sorted(captions)}")
  return captions[split]


def vocabulary(config: ml_collections.ConfigDict,
               workdir: Optional[paths.PathLike] = None) -> text_lib.Vocabulary:
  """The run's vocabulary: `WORKDIR/vocab.json` if it exists, else built from the
  training split's captions (at most `config.text.vocab_size` entries) and, given a
  `workdir`, saved there by process 0."""
  file = paths.path(workdir) / VOCAB_FILE if workdir is not None else None
  if file is not None and file.exists():
    return text_lib.Vocabulary.load(file)
  captions = [c for video in read_captions(config, config.data.train_split) for c in video]
  vocab = text_lib.Vocabulary.build(captions, config.text.vocab_size)
  if file is not None and jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(file)
  logging.info("vocabulary: %d words from %d training captions", len(vocab), len(captions))
  return vocab


class CaptionEncoder:
  """Captions -> text fields, as `config.text` says (see the module docstring).

  Args:
    max_words: tokens per caption (padded or cut).
    vocab: the vocabulary, for the word encoders.
    vectors: caption -> vector, for `text.encoder='precomputed'`.
    vectors_file: where `vectors` came from (named in errors).
    drop_unknown: leave words out of the vocabulary out, as HowTo100M does,
      instead of mapping them to `<unk>`.
  """

  def __init__(self, max_words: int, vocab: Optional[text_lib.Vocabulary] = None,
               vectors: Optional[dict] = None, vectors_file: str = "",
               drop_unknown: bool = False):
    self.max_words = max_words
    self.vocab = vocab
    self.vectors = vectors
    self.vectors_file = vectors_file
    self.drop_unknown = drop_unknown

  def encode(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Text fields of a list of captions, `(N, ...)`."""
    if self.vectors is not None:
      missing = [c for c in captions if c not in self.vectors]
      if missing:
        raise ValueError(f"{len(missing)} captions have no vector in {self.vectors_file} "
                         f"(config.text.precomputed), e.g. {missing[0]!r}")
      return {"vectors": np.stack([self.vectors[c] for c in captions]).astype(np.float32)}
    tokens, mask = self.vocab.encode_batch(captions, self.max_words,
                                           drop_unknown=self.drop_unknown)
    return {"tokens": tokens, "token_mask": mask}

  def sample(self, captions: Sequence, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The text fields of one caption drawn at random (UTF-8 bytes or str)."""
    chosen = captions[int(rng.integers(len(captions)))]
    chosen = chosen.decode("utf-8") if isinstance(chosen, bytes) else str(chosen)
    return {k: v[0] for k, v in self.encode([chosen]).items()}


def caption_encoder(config: ml_collections.ConfigDict,
                    workdir: Optional[paths.PathLike] = None) -> CaptionEncoder:
  """The :class:`CaptionEncoder` of a config (and run: its saved vocabulary).

  Raises:
    ValueError: precomputed vectors of another width than `config.text.vector_dim`.
  """
  t = config.text
  if t.encoder != "precomputed":
    return CaptionEncoder(t.max_words, vocab=vocabulary(config, workdir),
                          drop_unknown=t.drop_unknown)
  if not t.precomputed:
    raise ValueError("config.text.encoder='precomputed' needs config.text.precomputed, an "
                     ".npz of 'captions' and 'vectors'")
  vectors = text_lib.load_text_vectors(t.precomputed)
  width = len(next(iter(vectors.values())))
  if width != t.vector_dim:
    raise ValueError(f"the vectors of {t.precomputed} have {width} dimensions but "
                     f"config.text.vector_dim is {t.vector_dim}; set "
                     f"--config.text.vector_dim={width}")
  return CaptionEncoder(t.max_words, vectors=vectors, vectors_file=t.precomputed)


def init_word_vectors(variables, config: ml_collections.ConfigDict):
  """`variables` (host arrays) with the word embeddings of `config.text.word_vectors`
  for the vocabulary's words that the file has (the others keep their init)."""
  t = config.text
  if not t.word_vectors or t.encoder == "precomputed":
    return variables
  words = vocabulary(config).words
  vectors, found = text_lib.load_word_vectors(t.word_vectors, words, t.word_dim,
                                              t.word_vectors_format)
  table = np.array(variables["params"]["text"]["embed"]["embedding"])
  table[:len(words)][found] = vectors[found]
  variables["params"]["text"]["embed"]["embedding"] = table
  logging.info("word vectors: %d of %d words from %s", int(found.sum()), len(words),
               t.word_vectors)
  return variables


class ArrayLoader:
  """Every row of some arrays once (captions, cached features), batched and split
  across processes like `pipeline.make_eval_loader`'s videos."""

  def __init__(self, fields: dict[str, np.ndarray], batch_size: int, process_index: int,
               process_count: int):
    n = len(next(iter(fields.values())))
    padded = pipeline.PaddedEvalSource(range(n), process_count, batch_size)
    block = np.arange(process_index * padded.per_padded,
                      (process_index + 1) * padded.per_padded)
    self.index = np.array([padded.real_index(i) for i in block], np.int64)
    self.fields = fields
    self.batch_size = batch_size
    self.num_batches = padded.per_padded // batch_size

  def __iter__(self):
    for b in range(self.num_batches):
      index = self.index[b * self.batch_size:(b + 1) * self.batch_size]
      real = index >= 0
      batch = {k: np.where(real.reshape((-1,) + (1,) * (v.ndim - 1)), v[np.maximum(index, 0)],
                           np.zeros_like(v[:1]))
               for k, v in self.fields.items()}
      batch.update(mask=real, video_index=index)
      yield batch


def array_loader(fields: dict[str, np.ndarray], batch_size: int) -> ArrayLoader:
  """An :class:`ArrayLoader` of `fields` for this process."""
  return ArrayLoader(fields, batch_size, jax.process_index(), jax.process_count())


# A frozen video network's features ---------------------------------------------------


def video_features(config: ml_collections.ConfigDict, workdir: paths.PathLike, split: str,
                   mesh) -> np.ndarray:
  """The frozen video network's pooled features `(N, C)` of a split's videos, in the
  data source's order: `WORKDIR/video_features/<split>.npz` if it exists, else
  computed with the eval views of `config.eval` (averaged) and saved there.

  Raises:
    ValueError: neither `config.init_from` nor `config.model.pretrained` is set (a
      frozen network of random weights is no encoder).
  """
  file = paths.path(workdir) / FEATURES_DIR / f"{split}.npz"
  if file.exists():
    with np.load(io.BytesIO(file.read_bytes())) as saved:
      return saved["features"]
  features = _compute_features(config, split, mesh)
  if jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, features=features)
    file.write_bytes(buffer.getvalue())
  return features


def _compute_features(config: ml_collections.ConfigDict, split: str, mesh) -> np.ndarray:
  # pylint: disable=g-import-not-at-top
  from gta_jax.evaluation import evaluator
  from gta_jax.models import registry
  from gta_jax.retrieval import model as model_lib
  from gta_jax.training import sharding
  from gta_jax.training import state
  from gta_jax.training import steps
  # pylint: enable=g-import-not-at-top
  if not (config.init_from or config.model.pretrained):
    raise ValueError("config.retrieval.video_encoder='frozen' needs the network's weights: "
                     "set config.init_from (a run of this project) or "
                     "config.model.pretrained (ImageNet weights)")
  network = registry.build_video_network(config, 0)
  clip = jax.numpy.zeros(state.input_shape(config), jax.numpy.float32)
  variables = jax.jit(lambda r: network.init({"params": r}, clip))(jax.random.key(0))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  variables = model_lib.load_video_weights(jax.device_get(variables), config)
  variables = sharding.replicate(variables, mesh)

  def features_step(variables, batch):
    video = batch["video"]
    b, v = video.shape[:2]
    pooled = network.apply(variables, steps.prepare_video(
        video.reshape((b * v,) + video.shape[2:])))
    return {"features": pooled.reshape(b, v, -1).mean(axis=1), "mask": batch["mask"],
            "video_index": batch["video_index"]}

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  step = jax.jit(features_step, in_shardings=(rep, data), out_shardings=rep)
  loader = pipeline.make_eval_loader(config, split, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  logging.info("computing the frozen video network's features of the %s split", split)
  return evaluator.predict(step, variables, loader, mesh, progress=True)["features"]


class FeatureSource:
  """A split's cached features and captions, as a random-access source of videos."""

  def __init__(self, features: np.ndarray, captions: Sequence[Sequence[str]]):
    if len(features) != len(captions):
      raise ValueError(f"{len(features)} cached features for {len(captions)} videos: "
                       f"delete the stale {FEATURES_DIR}/ folder of the run")
    self.features = features
    self.captions = captions

  def __len__(self) -> int:
    return len(self.features)

  def __getitem__(self, i):
    return {"features": self.features[int(i)], "captions": self.captions[int(i)]}


class FeatureTransform(grain.transforms.RandomMap):  # pylint: disable=abstract-method
  """A cached video -> its features, index and one random caption's text fields."""

  def __init__(self, encoder: CaptionEncoder):
    self.encoder = encoder

  def random_map(self, element, rng: np.random.Generator):
    return {"features": element["features"], "video_index": np.int64(element["index"]),
            **self.encoder.sample(element["captions"], rng)}


def make_train_loader(config: ml_collections.ConfigDict, workdir: paths.PathLike, *,
                      process_index: int, process_count: int, mesh):
  """Retrieval's training batches: clips (or a frozen network's cached features), the
  videos' indices and a random caption of each (`pipeline.make_train_loader`)."""
  encoder = caption_encoder(config, workdir)
  kwargs = dict(seed=config.seed, process_index=process_index, process_count=process_count,
                mesh=mesh, with_index=True)
  if config.retrieval.video_encoder != "frozen":
    return pipeline.make_train_loader(config, caption_encoder=encoder, **kwargs)
  split = config.data.train_split
  source = FeatureSource(video_features(config, workdir, split, mesh),
                         read_captions(config, split))
  return pipeline.make_train_loader(config, source=source, transform=FeatureTransform(encoder),
                                    **kwargs)
