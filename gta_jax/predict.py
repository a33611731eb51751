r"""Predicts the action classes of video files with a trained checkpoint.

  python -m gta_jax.predict --config configs/X.py --workdir DIR VIDEO|FOLDER ... \
      [--top_k 5] [--json] [--out top5.csv] [--checkpoint_step latest|best|N] \
      [--config.a.b=value ...]

A VIDEO is any file PyAV decodes (mp4, webm, avi, ...), local or in a bucket
(`gs://...`, copied to a temporary file first), or a local folder of frames. A
FOLDER that holds video files stands for all of them (searched recursively, in name
order). Videos are decoded in threads and predicted `config.eval.batch_size` at a
time; `--out` writes a CSV with the top-k classes and probabilities of each. Each one
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

import concurrent.futures
import json
import os
import sys
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from gta_jax import cli
from gta_jax import paths
from gta_jax.data import builders
from gta_jax.data import pipeline
from gta_jax.data import video_io


class VideoError(ValueError):
  """A video file that cannot be predicted (missing, undecodable, no frames)."""


def expand_videos(videos: Sequence[str]) -> list[str]:
  """`videos` with each folder that holds video files replaced by those files.

  The files of a folder are found recursively (by extension,
  `video_io.VIDEO_EXTENSIONS`) and sorted; files, frame folders and missing paths
  are kept as given (a missing one fails later, named).
  """
  out = []
  for video in videos:
    root = paths.path(video)
    found = []
    if root.is_dir():
      found = sorted(str((folder / name).relative_to(root))
                     for folder, _, names in root.walk() for name in names
                     if os.path.splitext(name)[1].lower() in video_io.VIDEO_EXTENSIONS)
    out.extend([os.path.join(video, f) for f in found] or [video])
  return out


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
    feature_layer: also give each video's pooled features of this layer
      (`steps.make_eval_step`).
  """

  def __init__(self, config, workdir: str, step: Union[int, str] = "latest",
               feature_layer: Optional[str] = None):
    from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
    from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
    from gta_jax.training import steps  # pylint: disable=g-import-not-at-top
    self.config = config
    mesh = sharding.local_mesh()
    self.variables, self.step = checkpoint.restore_variables(config, workdir, step, mesh)
    self.class_names = class_names(config)
    self._eval_step = steps.make_eval_step(registry.build_model(config),
                                           feature_layer=feature_layer)

  def predict_batch(self, views: np.ndarray) -> Dict[str, np.ndarray]:
    """uint8 `(B, V, T, S, S, 3)` views of B videos -> `probs (B, K)` (and `features`)."""
    out = self._eval_step(self.variables, {"video": views})
    return {k: np.asarray(v) for k, v in out.items()}

  def predict_views(self, views: np.ndarray) -> np.ndarray:
    """uint8 `(V, T, S, S, 3)` views of one video -> class probabilities `(K,)`."""
    return self.predict_batch(views[None])["probs"][0]

  def predict_files(self, videos: Sequence[str], batch_size: int = 0
                    ) -> Iterator[Tuple[str, Union[Dict[str, np.ndarray], VideoError]]]:
    """Yields `(video, outputs)` in order: `outputs` is `{'probs': (K,), ...}` (one
    video's row of :meth:`predict_batch`), or the `VideoError` of a file that
    cannot be read (the others go on).

    Args:
      videos: files or frame folders (see :func:`expand_videos` for folders of files).
      batch_size: videos per step; 0 takes `config.eval.batch_size` (at most the
        number of videos). The last batch is padded, so the step compiles once.
    """
    batch_size = min(batch_size or self.config.eval.batch_size, max(len(videos), 1))

    def load(path):
      try:
        return load_views(path, self.config)
      except VideoError as e:
        return e

    threads = min(batch_size, pipeline.host_cores())
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for start in range(0, len(videos), batch_size):
        chunk = videos[start:start + batch_size]
        loaded = list(pool.map(load, chunk))
        good = [views for views in loaded if not isinstance(views, VideoError)]
        if good:
          batch = np.zeros((batch_size,) + good[0].shape, good[0].dtype)
          batch[:len(good)] = good
          outputs = self.predict_batch(batch)
        rows = iter(range(len(good)))
        for path, views in zip(chunk, loaded):
          if isinstance(views, VideoError):
            yield path, views
          else:
            i = next(rows)
            yield path, {k: v[i] for k, v in outputs.items()}

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


def csv_text(results: Sequence[Dict[str, Any]], k: int) -> str:
  """The CSV of `run`'s results: `video`, then `class_i,probability_i` for i = 1..k,
  then `error` (empty unless the video could not be read)."""
  from gta_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  rows = [["video"] + [f"{c}_{i}" for i in range(1, k + 1)
                       for c in ("class", "probability")] + ["error"]]
  for r in results:
    ranked = [x for e in r.get("top_k", ()) for x in (e["class"], f"{e['probability']:.6f}")]
    rows.append([r["video"]] + (ranked or [""] * 2 * k) + [r.get("error", "")])
  return reports.csv_text(rows)


def run(config, workdir: str, videos: Sequence[str], *, k: int = 5, as_json: bool = False,
        step: Union[int, str] = "latest", out: str = "") -> int:
  """Predicts `videos` (folders expanded), prints the top-`k` of each and writes them to
  the CSV `out` if given; returns 0, or 1 if any file failed."""
  predictor = Predictor(config, workdir, step)
  videos = expand_videos(videos)
  k = min(k, len(predictor.class_names))
  results, failed = [], 0
  for path, outputs in predictor.predict_files(videos):
    if isinstance(outputs, VideoError):
      failed += 1
      print(f"error: {outputs}", file=sys.stderr, flush=True)
      results.append({"video": path, "error": str(outputs)})
      continue
    ranked = top_k(outputs["probs"], predictor.class_names, k)
    results.append({"video": path, "top_k": [{"class": n, "probability": p}
                                             for n, p in ranked]})
    if not as_json:
      print(_format_text(path, ranked), flush=True)
  if as_json:
    print(json.dumps({"checkpoint_step": predictor.step, "predictions": results}, indent=1))
  if out:
    paths.path(out).write_text(csv_text(results, k))
    print(f"wrote {out} ({len(results) - failed} videos)", file=sys.stderr)
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
  try:
    return run(f.config, f.workdir, videos, k=f.top_k, as_json=f.json, step=step,
               out=f.out)
  except cli.USER_ERRORS as e:
    return cli.report_error(e)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  cli.define_run_flags()
  flags.DEFINE_integer("top_k", 5, "How many classes to print per video.")
  flags.DEFINE_bool("json", False, "Print one JSON document instead of text.")
  flags.DEFINE_string("out", "", "Also write the top-k of every video to this CSV file.")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
