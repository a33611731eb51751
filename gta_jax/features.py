r"""One feature vector per video from a trained checkpoint.

  python -m gta_jax.features --config configs/X.py --workdir DIR --split val \
      --out features.npz [--layer pre_logits|res2|res3|res4|res5] \
      [--checkpoint_step latest|best|N] [--config.a.b=value ...]
  python -m gta_jax.features --config configs/X.py --workdir DIR --out f.npz \
      --videos VIDEO|FOLDER [VIDEO|FOLDER ...]

A video's vector is the pooled output of `--layer`, averaged over the config's eval
views (`config.eval.num_clips` x `config.eval.num_crops`): by default the pre-logits,
the vector the classifier maps to the logits. A split goes through the evaluation
path itself (`evaluate.validate` with `steps.make_eval_step(feature_layer=...)`),
files through `predict`'s (same views, same batching). The `.npz` holds:

* `features`: float32 `(N, C)`;
* `video_id`: str `(N,)`, the dataset's ids (the paths given, for `--videos`);
* `label`: int32 `(N,)`, the class index (-1 for `--videos`);
* `class_names`, `layer`, `step`, `split` (`""` for `--videos`).

An unreadable file is named on stderr, skipped and counted (exit status 1); a missing
workdir or checkpoint, an unknown split or layer is a one-line error.
docs/features.md shows a linear probe and a retrieval on these files.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
from absl import app
from absl import flags

from gta_jax import cli
from gta_jax import paths
from gta_jax import predict
from gta_jax.data import pipeline
from gta_jax.data import preparation
from gta_jax.evaluation import evaluate
from gta_jax.models import registry
from gta_jax.models import resnet
from gta_jax.training import checkpoint
from gta_jax.training import sharding
from gta_jax.training import steps
from gta_jax.training import writers

Step = Union[int, str]


def extract_split(config, workdir: str, split: Optional[str] = None, step: Step = "latest",
                  layer: str = "pre_logits", progress: bool = False) -> Dict[str, Any]:
  """The features of every video of a prepared split (see the module docstring).

  Args:
    config: the config the checkpoint was trained with.
    workdir: the training run's directory.
    split: defaults to `config.eval.split`.
    step: a step, 'latest' or 'best'.
    layer: one of `resnet.FEATURE_LAYERS`.
    progress: show a progress bar.

  Returns:
    The arrays of the `.npz` (module docstring), rows in the split's order.
  """
  resnet.check_feature_layer(layer)
  split = split or config.eval.split
  mesh = sharding.make_mesh()
  config = evaluate.for_devices(config)
  meta = preparation.prepare_dataset(config)
  source = pipeline.open_source(config, split)  # an unknown split fails here, named
  variables, step = checkpoint.restore_variables(config, workdir, step, mesh)
  eval_step = steps.make_eval_step(registry.build_model(config), mesh, feature_layer=layer)
  predictions, _ = evaluate.validate(config, eval_step, variables, mesh, split,
                                     progress=progress)
  ids = [_text(source[int(i)]["video_id"]) for i in predictions["video_index"]]
  return dict(features=predictions["features"].astype(np.float32),
              video_id=np.array(ids, dtype=str), label=predictions["label"].astype(np.int32),
              class_names=np.array(meta.class_names, dtype=str), layer=layer, step=step,
              split=split)


def extract_videos(config, workdir: str, videos: Sequence[str], step: Step = "latest",
                   layer: str = "pre_logits") -> tuple[Dict[str, Any], list[str]]:
  """The features of video files and folders (as `predict` reads them).

  Returns:
    `(arrays, errors)`: the `.npz` arrays of the videos that could be read, and one
    message per video that could not.
  """
  predictor = predict.Predictor(config, workdir, step, feature_layer=layer)
  features, ids, errors = [], [], []
  for path, outputs in predictor.predict_files(predict.expand_videos(videos)):
    if isinstance(outputs, predict.VideoError):
      print(f"error: {outputs}", file=sys.stderr, flush=True)
      errors.append(str(outputs))
    else:
      features.append(outputs["features"])
      ids.append(path)
  width = features[0].shape[-1] if features else 0
  arrays = dict(features=np.array(features, np.float32).reshape(len(ids), width),
                video_id=np.array(ids, dtype=str), label=np.full(len(ids), -1, np.int32),
                class_names=np.array(predictor.class_names, dtype=str), layer=layer,
                step=predictor.step, split="")
  return arrays, errors


def save(out: str, arrays: Dict[str, Any]) -> None:
  """Writes the arrays to the `.npz` file `out` (local or remote)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  out = paths.path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(buffer.getvalue())


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def main(argv):
  f = flags.FLAGS
  videos = argv[1:]
  if bool(videos) != f.videos:
    raise app.UsageError("--videos takes video files or folders after the flags; "
                         f"without it no arguments are expected (got {videos})")
  writers.quiet_library_logs()
  step = cli.checkpoint_step()
  errors = []
  try:
    if f.videos:
      arrays, errors = extract_videos(f.config, f.workdir, videos, step, f.layer)
    else:
      arrays = extract_split(f.config, f.workdir, f.split, step, f.layer, progress=True)
  except cli.USER_ERRORS as e:
    return cli.report_error(e)
  save(f.out, arrays)
  n, width = arrays["features"].shape
  print(f"wrote {f.out}: {n} videos x {width} features ({f.layer}, step {arrays['step']})",
        flush=True)
  if errors:
    print(f"{len(errors)} of {n + len(errors)} videos could not be read", file=sys.stderr)
  return 1 if errors else 0


def _define_flags() -> None:
  cli.define_run_flags()
  flags.DEFINE_string("out", None, "The .npz file to write.")
  flags.DEFINE_string("split", None, "The prepared split (default config.eval.split).")
  flags.DEFINE_bool("videos", False, "Read the video files and folders given after the "
                    "flags instead of a split.")
  flags.DEFINE_enum("layer", resnet.PRE_LOGITS, resnet.FEATURE_LAYERS,
                    "The pooled output to take: the pre-logits or a stage's.")
  flags.mark_flag_as_required("out")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
