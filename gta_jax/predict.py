r"""Predicts the action classes of video files with a trained checkpoint.

  python -m gta_jax.predict --config configs/X.py --workdir DIR VIDEO [VIDEO ...] \
      [--top_k 5] [--json] [--checkpoint_step latest|best|N] [--config.a.b=value ...]

A VIDEO is any file PyAV decodes (mp4, webm, avi, ...), local or in a bucket
(`gs://...`, copied to a temporary file first), or a local folder of frames. Each one
goes through exactly what evaluation does to a prepared video: its frames are resized
(short side `config.data.resize_short`) and JPEG-encoded as at preparation, then the
config's eval views are taken (`config.eval.num_clips` x `config.eval.num_crops`,
`pipeline.EvalTransform`) and the softmax is averaged over them. Class names come from
the prepared dataset the model was trained on (class indices if it is not in
`config.data.data_dir`).

A missing or undecodable file is reported on stderr and the others are still predicted;
the exit status is 1 if any file failed. From Python:

  predictor = Predictor(config, workdir)
  probs = predictor.predict_file("clip.mp4")       # (num_classes,)
  top_k(probs, predictor.class_names, 5)           # [(name, probability), ...]
"""

from __future__ import annotations

import json
import sys
from typing import Sequence, Union

import numpy as np

from gta_jax import cli
from gta_jax import paths
from gta_jax.data import builders
from gta_jax.data import pipeline
from gta_jax.data import video_io


class VideoError(ValueError):
  """A video file that cannot be predicted (missing, undecodable, no frames)."""


def load_views(path: str, config) -> np.ndarray:
  """The eval views of one video: uint8 `(V, T, S, S, 3)`, as `make_eval_loader` makes them.

  Raises:
    VideoError: the path does not exist or holds no decodable frames.
  """
  if not paths.path(path).exists():
    raise VideoError(f"{path}: no such file or folder")
  d = config.data
  with paths.local_file(path) as local:
    jpegs, _, error = video_io.load_video(video_io.VideoItem(local, 0, path),
                                          resize_short=d.resize_short,
                                          jpeg_quality=d.jpeg_quality)
  if error is not None:
    raise VideoError(f"{path}: cannot decode the video ({error})")
  element = {"frames": jpegs, "label": 0, "index": 0}
  return pipeline.EvalTransform(d, config.eval).map(element)["video"]


def class_names(config) -> tuple[str, ...]:
  """The class names of the prepared dataset, or `('0', '1', ...)` if it is not prepared."""
  path = builders.prepared_dir(config.data)
  if pipeline.is_prepared(path):
    names = pipeline.read_meta(path).class_names
    if len(names) != config.model.num_classes:
      raise ValueError(f"the dataset at {path} has {len(names)} classes but "
                       f"config.model.num_classes is {config.model.num_classes}: is this the "
                       "config the checkpoint was trained with?")
    return names
  print(f"warning: dataset {config.data.dataset!r} is not prepared at {path}; classes are "
        "shown by index (set --config.data.data_dir to where it was prepared for names)",
        file=sys.stderr)
  return tuple(str(i) for i in range(config.model.num_classes))


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
  """The `k` most probable classes, most probable first (ties: the lower index first)."""
  order = np.argsort(-np.asarray(probs), kind="stable")[:k]
  return [(names[i], float(probs[i])) for i in order]


class Predictor:
  """A checkpoint's model, ready to predict video files on one device.

  Args:
    config: the config the checkpoint was trained with.
    workdir: the training run's directory.
    step: a step number, 'latest' or 'best' (highest validation top-1).
  """

  def __init__(self, config, workdir: str, step: Union[int, str] = "latest"):
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
    from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
    from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
    from gta_jax.training import steps  # pylint: disable=g-import-not-at-top
    self.config = config
    mesh = Mesh(np.array(jax.local_devices()[:1]), (sharding.DATA_AXIS,))
    self.variables, self.step = checkpoint.restore_variables(config, workdir, step, mesh)
    self.class_names = class_names(config)
    self._eval_step = steps.make_eval_step(registry.build_model(config))

  def predict_views(self, views: np.ndarray) -> np.ndarray:
    """uint8 `(V, T, S, S, 3)` views of one video -> class probabilities `(K,)`."""
    out = self._eval_step(self.variables, {"video": views[None]})
    return np.asarray(out["probs"][0])

  def predict_file(self, path: str) -> np.ndarray:
    """Class probabilities `(K,)` of a video file, averaged over the eval views.

    Raises:
      VideoError: the file is missing or cannot be decoded.
    """
    return self.predict_views(load_views(path, self.config))


def _format_text(path: str, ranked: list[tuple[str, float]]) -> str:
  width = max(len(name) for name, _ in ranked)
  lines = [path]
  lines += [f"  {i}. {name:<{width}}  {p:.4f}" for i, (name, p) in enumerate(ranked, 1)]
  return "\n".join(lines)


def run(config, workdir: str, videos: Sequence[str], *, k: int = 5, as_json: bool = False,
        step: Union[int, str] = "latest") -> int:
  """Predicts `videos`, prints the top-`k` of each; returns 0, or 1 if any file failed."""
  predictor = Predictor(config, workdir, step)
  k = min(k, len(predictor.class_names))
  results, failed = [], 0
  for path in videos:
    try:
      ranked = top_k(predictor.predict_file(path), predictor.class_names, k)
    except VideoError as e:
      failed += 1
      print(f"error: {e}", file=sys.stderr, flush=True)
      results.append({"video": path, "error": str(e)})
      continue
    if as_json:
      results.append({"video": path, "top_k": [{"class": n, "probability": p}
                                               for n, p in ranked]})
    else:
      print(_format_text(path, ranked), flush=True)
  if as_json:
    print(json.dumps({"checkpoint_step": predictor.step, "predictions": results}, indent=1))
  if failed:
    print(f"{failed} of {len(videos)} videos could not be predicted", file=sys.stderr)
  return 1 if failed else 0


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:  # orbax's restore logs, unless asked for
    logging.set_verbosity(logging.ERROR)
  videos = argv[1:]
  if not videos:
    raise app.UsageError("give one or more video files after the flags")
  f = flags.FLAGS
  if f.top_k < 1:
    raise app.UsageError(f"--top_k must be >= 1, got {f.top_k}")
  step = cli.checkpoint_step()
  return run(f.config, f.workdir, videos, k=f.top_k, as_json=f.json, step=step)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The config the checkpoint was "
                                  "trained with.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("top_k", 5, "How many classes to print per video.")
  flags.DEFINE_bool("json", False, "Print one JSON document instead of text.")
  cli.define_checkpoint_step_flag()
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
