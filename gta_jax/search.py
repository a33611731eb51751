r"""Ranks videos for a typed query with a text-video retrieval checkpoint.

  python -m gta_jax.search --config configs/X.py --workdir DIR --query "TEXT" \
      (--videos FOLDER|VIDEO ... | --split NAME) [--top 5] [--checkpoint_step N]

`--videos` takes video files, frame folders, or folders of video files (searched
recursively, as `gta_jax.predict` does); `--split` the videos of a prepared split of
`config.data`. Each video goes through the config's eval views (as in evaluation) and
the embeddings are cached in `WORKDIR/search/` under a key of the checkpoint step,
the views and the files (paths, sizes, modification times), so that the next query
over the same videos embeds only the text. Prints the `--top` videos, best first,
with their scores (cosine similarities); an unreadable file is reported on stderr
and left out.

From Python: `index = SearchIndex(config, workdir)`,
`index.embed_files(paths)` -> `(paths, embeddings)`, `index.rank(query, paths, emb)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from typing import Sequence, Union

import numpy as np

from gta_jax import cli
from gta_jax import paths
from gta_jax import predict

CACHE_DIR = "search"


class SearchIndex(predict.Predictor):
  """A retrieval checkpoint's video and text embedding, on one device.

  Args:
    config: the config the checkpoint was trained with (`task='retrieval'`).
    workdir: the training run's directory (its checkpoint and vocabulary).
    step: a step number, 'latest' or 'best'.
  """

  def __init__(self, config, workdir: str, step: Union[int, str] = "latest"):  # pylint: disable=super-init-not-called
    # pylint: disable=g-import-not-at-top
    from gta_jax.models import registry
    from gta_jax.retrieval import data
    from gta_jax.retrieval import steps
    from gta_jax.training import checkpoint
    from gta_jax.training import sharding
    # pylint: enable=g-import-not-at-top
    if config.get("task", "classification") != "retrieval":
      raise ValueError(f"search needs a text-video retrieval run (config.task="
                       f"'retrieval'), got config.task={config.get('task')!r}")
    self.config = config
    self.workdir = workdir
    self.variables, self.step = checkpoint.restore_variables(config, workdir, step,
                                                             sharding.local_mesh())
    model = registry.build_model(config)
    self._eval_step = steps.make_video_step(model)
    self._text_step = steps.make_text_step(model)
    self.encoder = data.caption_encoder(config, workdir)

  def embed_query(self, query: str) -> np.ndarray:
    """The query's embedding `(D,)`."""
    out = self._text_step(self.variables, self.encoder.encode([query]))
    return np.asarray(out["features"])[0]

  def _cache_file(self, videos: Sequence[str]):
    key = hashlib.sha1(json.dumps({
        "step": self.step, "views": [self.config.eval.num_clips, self.config.eval.num_crops],
        "files": [(v, *_stat(v)) for v in videos]}).encode()).hexdigest()[:16]
    return paths.path(self.workdir) / CACHE_DIR / f"{key}.npz"

  def embed_files(self, videos: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """`(readable videos, their embeddings (N, D))`, from the cache when it has them;
    unreadable files are reported on stderr."""
    if self.config.retrieval.video_encoder == "frozen":
      raise ValueError("this run's video network is frozen and not in its checkpoint: "
                       "search a prepared split (--split) whose features it cached")
    cache = self._cache_file(videos)
    if cache.exists():
      with np.load(io.BytesIO(cache.read_bytes())) as saved:
        return [str(p) for p in saved["paths"]], saved["embeddings"]
    kept, rows = [], []
    for path, outputs in self.predict_files(videos):
      if isinstance(outputs, predict.VideoError):
        print(f"error: {outputs}", file=sys.stderr, flush=True)
        continue
      kept.append(path)
      rows.append(outputs["features"])
    if not rows:
      raise ValueError(f"none of the {len(videos)} videos could be read")
    embeddings = np.stack(rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.array(kept), embeddings=embeddings)
    cache.write_bytes(buffer.getvalue())
    return kept, embeddings

  def embed_split(self, split: str) -> tuple[list[str], np.ndarray]:
    """`(video ids, embeddings (N, D))` of a prepared split of `config.data`."""
    # pylint: disable=g-import-not-at-top
    from gta_jax.data import pipeline
    from gta_jax.data import preparation
    from gta_jax.retrieval import evaluate
    from gta_jax.training import sharding
    # pylint: enable=g-import-not-at-top
    preparation.prepare(self.config.data)
    source = pipeline.open_source(self.config, split)
    ids = [source[i]["video_id"] for i in range(len(source))]
    ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in ids]
    embedder = evaluate.Embedder(self.config, sharding.local_mesh(), self.workdir)
    return ids, embedder.videos(self.variables, split)

  def rank(self, query: str, names: Sequence[str], embeddings: np.ndarray, top: int
           ) -> list[tuple[str, float]]:
    """The `top` best videos for `query`, best first (ties: the earlier first)."""
    scores = embeddings @ self.embed_query(query)
    order = np.argsort(-scores, kind="stable")[:top]
    return [(names[i], float(scores[i])) for i in order]


def _stat(path: str) -> tuple[int, float]:
  try:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime
  except OSError:
    return -1, 0.0


def run(config, workdir: str, query: str, *, videos: Sequence[str] = (), split: str = "",
        top: int = 5, step: Union[int, str] = "latest") -> list[tuple[str, float]]:
  """Prints and returns the `top` videos for `query` (see the module docstring)."""
  index = SearchIndex(config, workdir, step)
  if split:
    names, embeddings = index.embed_split(split)
  else:
    names, embeddings = index.embed_files(predict.expand_videos(videos))
  ranked = index.rank(query, names, embeddings, top)
  print(f"query: {query!r} (checkpoint step {index.step}, {len(names)} videos)")
  for i, (name, score) in enumerate(ranked, 1):
    print(f"  {i}. {score:+.4f}  {name}", flush=True)
  return ranked


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  f = flags.FLAGS
  videos = list(f.videos or []) + list(argv[1:])
  if bool(videos) == bool(f.split):
    raise app.UsageError("give --videos (files or folders) or --split, not both")
  if f.top < 1:
    raise app.UsageError(f"--top must be >= 1, got {f.top}")
  try:
    run(f.config, f.workdir, f.query, videos=videos, split=f.split, top=f.top,
        step=cli.checkpoint_step())
  except cli.USER_ERRORS as e:
    return cli.report_error(e)
  return 0


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  cli.define_run_flags()
  flags.DEFINE_string("query", None, "The text to search for.", required=True)
  flags.DEFINE_multi_string("videos", None, "Video files, frame folders or folders of "
                            "videos to search.")
  flags.DEFINE_string("split", "", "Search a prepared split of config.data instead.")
  flags.DEFINE_integer("top", 5, "How many videos to print.")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
