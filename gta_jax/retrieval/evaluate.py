"""Retrieval evaluation: embed a split's videos and captions, rank, report.

The videos go through the config's eval views (`config.eval`, embeddings averaged
over the views); every caption of the split is a text-to-video query, and every
video a video-to-text query ranked by its best caption (`metrics`). Writes
`WORKDIR/eval/<split>_step<N>.json` (`t2v_r1` ... `v2t_meanr`, `rsum`,
`num_videos`, `num_captions`, `step`, `split`, `num_views`) and
`<split>_step<N>_ranks.csv` (each caption's video and text-to-video rank).
"""

import json
from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import ml_collections
import numpy as np
from absl import logging

from gta_jax import paths
from gta_jax.data import pipeline
from gta_jax.data import preparation
from gta_jax.evaluation import evaluate as classification_eval
from gta_jax.evaluation import evaluator
from gta_jax.evaluation import reports
from gta_jax.models import registry
from gta_jax.retrieval import data
from gta_jax.retrieval import metrics
from gta_jax.retrieval import model as model_lib
from gta_jax.retrieval import steps
from gta_jax.training import checkpoint
from gta_jax.training import sharding

SCORE = "rsum"  # what picks the best checkpoint and drives the plateau schedule


class Embedder:
  """A model's video and caption embedding steps on a mesh, with the caption encoder."""

  def __init__(self, config: ml_collections.ConfigDict, mesh,
               workdir: Optional[paths.PathLike] = None):
    model = registry.build_model(config)
    self.config = config
    self.mesh = mesh
    self.workdir = workdir
    self.video_step = steps.make_video_step(model, mesh)
    self.text_step = steps.make_text_step(model, mesh)
    self.encoder = data.caption_encoder(config, workdir)

  def videos(self, variables, split: str, max_videos: int = 0, progress: bool = False
             ) -> np.ndarray:
    """The embeddings of a split's videos (an evenly spread subset of `max_videos`)."""
    if model_lib.is_frozen(self.config):
      features = data.video_features(self.config, self.workdir, split, self.mesh)
      if 0 < max_videos < len(features):
        features = features[pipeline.EvenSubset(features, max_videos).indices]
      loader = data.array_loader({"features": features}, self.config.eval.batch_size)
    else:
      loader = pipeline.make_eval_loader(
          self.config, split, process_index=jax.process_index(),
          process_count=jax.process_count(), max_videos=max_videos)
    return evaluator.predict(self.video_step, variables, loader, self.mesh,
                             progress)["features"]

  def captions(self, variables, captions) -> np.ndarray:
    """The embeddings of captions."""
    loader = data.array_loader(self.encoder.encode(captions), self.config.eval.batch_size)
    return evaluator.predict(self.text_step, variables, loader, self.mesh)["features"]


def validate(embedder: Embedder, variables, split: str, max_videos: int = 0,
             progress: bool = False) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """`(summary, details)` of the split (or an evenly spread subset of `max_videos`
  videos and their captions); `details` holds each caption's text, video and rank."""
  config = embedder.config
  per_video = data.read_captions(config, split)
  if 0 < max_videos < len(per_video):
    per_video = [per_video[i] for i in pipeline.EvenSubset(per_video, max_videos).indices]
  captions = [c for video in per_video for c in video]
  caption_video = np.repeat(np.arange(len(per_video)), [len(v) for v in per_video])
  video_emb = embedder.videos(variables, split, max_videos, progress)
  text_emb = embedder.captions(variables, captions)
  ranks = metrics.ranks(video_emb, text_emb, caption_video, mesh=embedder.mesh,
                        block_size=config.retrieval.eval_block_size)
  summary = metrics.summarize(ranks)
  summary.update(split=split, num_views=config.eval.num_clips * config.eval.num_crops)
  return summary, {"caption": captions, "video_index": caption_video, "rank": ranks["t2v"]}


def make_validator(config: ml_collections.ConfigDict, workdir: paths.PathLike, mesh=None
                   ) -> Callable[[Any, bool], Dict[str, Any]]:
  """The validation callback of `training.loop.train_and_evaluate` (as
  `evaluation.evaluate.make_validator`, with retrieval's summary)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  full = classification_eval.for_devices(config)
  quick = classification_eval.during_training(full)
  embedders = {}
  split = config.data.eval_split

  def validate_fn(variables, final: bool) -> Dict[str, Any]:
    if final not in embedders:  # built at the first call: the vocabulary is saved by then
      embedders[final] = Embedder(full if final else quick, mesh, workdir)
    max_videos = 0 if final else config.eval.during_training.max_videos
    return validate(embedders[final], variables, split, max_videos)[0]

  return validate_fn


def evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike,
             step: Union[int, str] = "latest", split: Optional[str] = None
             ) -> Dict[str, Any]:
  """Evaluates checkpoint `step` of `workdir` on `split` (default `config.eval.split`)
  and writes the reports of the module docstring; returns the summary."""
  split = split or config.eval.split
  mesh = sharding.make_mesh()
  config = classification_eval.for_devices(config)
  preparation.prepare(config.data)
  variables, step = checkpoint.restore_variables(config, workdir, step, mesh)
  summary, details = validate(Embedder(config, mesh, workdir), variables, split,
                              progress=True)
  summary["step"] = step
  if jax.process_index() == 0:
    out = paths.path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{split}_step{step}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    rows = [["caption", "video_index", "t2v_rank"]]
    rows += [[c, int(v), int(r)] for c, v, r in zip(details["caption"],
                                                    details["video_index"], details["rank"])]
    (out / f"{stem}_ranks.csv").write_text(reports.csv_text(rows))
    logging.info("wrote %s", out / f"{stem}.json")
  return summary
