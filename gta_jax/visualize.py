r"""Pictures of a training run: curves, learned temporal attention, sampled clips.

  python -m gta_jax.visualize --workdir DIR --out DIR [--checkpoint_step latest|best|N]
      [--clips 16] [--data_dir DIR]

writes `OUT/training_curves.png` (loss, accuracy and learning rate from
`DIR/metrics.jsonl`) and one `OUT/attention_<layer>.png` per temporal attention
layer, each head's T x T matrix as a heatmap (row `t`: how much frame `t` takes
from each frame `t'`):

* GTA: the learned global temporal attention `A_h`, `softmax(G_h)` or the variant
  the run's `config.model.gta.global_norm` names (docs/gta.md); a parameter, read
  from the checkpoint alone.
* SSA: the softmax `M_T` (masked as the run's `config.model.ssa.temporal_norm`
  masks it; that norm may apply `M_T - I` to the value), which depends on the
  clip: its mean over the first `--clips` validation clips of the run's dataset
  (the run's `config.data.data_dir`, or `--data_dir`), through the model rebuilt
  from the config saved with the checkpoint.

The figure functions return `matplotlib.figure.Figure`s built without pyplot, so
that they display inline in a notebook (`display(fig)`) and save anywhere.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from gta_jax import cli
from gta_jax import paths

CURVES_FILE = "training_curves.png"


# Training curves --------------------------------------------------------------------------


def read_metrics(path: paths.PathLike) -> List[Dict[str, Any]]:
  """The rows of a `metrics.jsonl`, by step; a resumed run's repeated rows count once.

  A row repeated for the same `(kind, split, step)` (logged again after a resume)
  keeps its last value. An unreadable line (a run killed while writing) is skipped.
  """
  rows = {}
  for line in paths.path(path).read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and "step" in row and "kind" in row:
      rows[(row["kind"], row.get("split", ""), row["step"])] = row
  return sorted(rows.values(), key=lambda r: (r["step"], r["kind"]))


def series(rows: Sequence[Dict[str, Any]], kind: str, name: str,
           split: str | None = None) -> Tuple[np.ndarray, np.ndarray]:
  """`(steps, values)` of metric `name` in the rows of `kind` (and `split`, if given)."""
  picked = [(r["step"], r[name]) for r in rows
            if r["kind"] == kind and name in r and (split is None or r.get("split") == split)]
  steps, values = zip(*picked) if picked else ((), ())
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def training_curves_figure(rows: Sequence[Dict[str, Any]], title: str = ""):
  """Loss, accuracy (train, and top-1/top-5 of each validated split) and learning rate."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(13, 3.6), layout="constrained")
  ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
  style = lambda steps: "o-" if len(steps) < 3 else "-"  # lone points stay visible
  for ax, name, label in ((ax_loss, "loss", "train loss"), (ax_acc, "accuracy", "train")):
    steps, values = series(rows, "train", name)
    ax.plot(steps, values, style(steps), label=label, alpha=0.8)
  # Validations during training (a cheaper protocol) and the full one: apart.
  for kind, suffix in (("eval_during_training", " (during training)"), ("eval", "")):
    for split in sorted({r.get("split", "") for r in rows if r["kind"] == kind}):
      steps, values = series(rows, kind, "loss", split)
      ax_loss.plot(steps, values, style(steps), label=f"{split}{suffix} loss")
      for name, line in (("top1", "o-"), ("top5", "o--")):
        steps, values = series(rows, kind, name, split)
        ax_acc.plot(steps, values, line,
                    label=f"{split}{suffix} {name.replace('top', 'top-')}")
  steps, values = series(rows, "train", "lr")
  ax_lr.plot(steps, values, style(steps))
  for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy"), (ax_lr, "learning rate")):
    ax.set_xlabel("step")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  ax_acc.set_ylim(0, 1)
  ax_loss.legend(fontsize=8)
  ax_acc.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return fig


# Attention --------------------------------------------------------------------------------


def load_attention_maps(workdir: str, step: Union[int, str] = "latest"
                        ) -> Tuple[Dict[str, np.ndarray], int]:
  """The learned global temporal attention of a checkpoint's GTA layers.

  Args:
    workdir: a training run's directory.
    step: a step number, 'latest' or 'best' (highest validation top-1).

  Returns:
    `({layer path: (heads, T, T) attention}, step)`, the matrices of
    `gta.global_attention_maps` under the checkpoint's `config.model.gta.global_norm`
    (`softmax` for a config without the key); an empty dict for a model without
    GTA layers.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from gta_jax.models import gta  # pylint: disable=g-import-not-at-top
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt, chosen = checkpoint.open_checkpoint(workdir, step)
  try:
    restored = ckpt.manager.restore(
        chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    global_norm = ckpt.saved_config(chosen)["model"].get("gta", {}).get(
        "global_norm", "softmax")
  finally:
    ckpt.close()
  maps = gta.global_attention_maps({"params": restored["state"]["params"]},
                                   global_norm)
  return {name: np.asarray(m) for name, m in maps.items()}, chosen


def load_ssa_maps(workdir: str, step: Union[int, str] = "latest", clips: int = 16,
                  data_dir: str = "") -> Tuple[Dict[str, np.ndarray], int, str]:
  """The temporal attention of a checkpoint's SSA layers, averaged over clips.

  Args:
    workdir: a training run's directory.
    step: a step number, 'latest' or 'best' (highest validation top-1).
    clips: how many validation clips (the first of the split, first view each).
    data_dir: where the dataset is prepared; '' for the run's `config.data.data_dir`.

  Returns:
    `({layer path: (heads, T, T) mean M_T}, step, what)`: the weights `M_T`
    (`ssa.WEIGHTS`) of every SSA layer, and `what`, a title saying how many clips
    and how `y` uses them; an empty dict for a run without SSA.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`, or its
      dataset is not prepared at the data directory.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from gta_jax.data import builders  # pylint: disable=g-import-not-at-top
  from gta_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from gta_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from gta_jax.models import ssa  # pylint: disable=g-import-not-at-top
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt, chosen = checkpoint.open_checkpoint(workdir, step)
  try:
    config = ml_collections.ConfigDict(ckpt.saved_config(chosen))
  finally:
    ckpt.close()
  if (config.get("task", "classification") != "classification"
      or "ssa" not in config.model.temporal_modules.split(",")):
    return {}, chosen, ""
  if data_dir:
    config.data.data_dir = data_dir
  prepared = builders.prepared_dir(config.data)
  if not pipeline.is_prepared(prepared):
    raise FileNotFoundError(
        f"{config.data.dataset!r} is not prepared at {prepared} (the run's "
        f"config.data.data_dir is {config.data.data_dir!r}; pass --data_dir)")
  variables, _ = checkpoint.restore_variables(config, workdir, chosen)
  config.eval.batch_size = clips
  config.data.num_workers = 0
  loader = pipeline.make_eval_loader(config, config.data.eval_split, process_index=0,
                                     process_count=1)
  batch = next(iter(loader))
  video = batch["video"][batch["mask"], 0]
  _, state = jax.jit(lambda v, x: build_model(config).apply(
      v, x, train=False, mutable=["intermediates"]))(variables, video)
  maps = {"/".join(path[:-1]): np.asarray(value[0]).mean(0) for path, value in
          traverse_util.flatten_dict(state["intermediates"]).items()
          if path[-1] == ssa.WEIGHTS}
  norm = config.model.ssa.temporal_norm
  return maps, chosen, f"SSA's M_T (temporal_norm {norm}), mean of {len(video)} val clips"


def attention_figure(layer: str, maps: np.ndarray, title: str = ""):
  """One layer's `(heads, T, T)` attention, a heatmap per head on a shared colour scale.

  The scale spans the layer's own range, so that the structure of a nearly uniform
  attention (`1/T` everywhere, as at init) stays visible; the colour bar gives it.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  heads, t, _ = maps.shape
  cols = min(heads, 4)
  rows = math.ceil(heads / cols)
  fig = Figure(figsize=(2.6 * cols + 1, 2.5 * rows + 0.6), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  vmin, vmax = float(maps.min()), float(maps.max())
  image = None
  for h, ax in enumerate(axes):
    if h >= heads:
      ax.axis("off")
      continue
    image = ax.imshow(maps[h], cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_title(f"head {h}", fontsize=9)
    ticks = range(0, t, max(1, t // 4))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if h % cols == 0:
      ax.set_ylabel("frame t")
    if h >= heads - cols:
      ax.set_xlabel("attends to frame t'")
  fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="weight (uniform = 1/T = "
               f"{1 / t:.3f})")
  fig.suptitle(title or layer, fontsize=10)
  return fig


def attention_filename(layer: str) -> str:
  """`res3_block0/post/pixel_temporal` -> `attention_res3_block0_post_pixel_temporal.png`."""
  return "attention_" + layer.replace("/", "_") + ".png"


# Clips ------------------------------------------------------------------------------------


def clip_figure(video: np.ndarray, title: str = ""):
  """The frames of one clip, uint8 `(T, H, W, 3)`, side by side."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  t = len(video)
  fig = Figure(figsize=(1.6 * t, 2.0), layout="constrained")
  for i, ax in enumerate(np.atleast_1d(fig.subplots(1, t))):
    ax.imshow(video[i])
    ax.set_title(f"t={i}", fontsize=8)
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


# All of a run -----------------------------------------------------------------------------


def save_run_figures(workdir: paths.PathLike, out: paths.PathLike,
                     step: Union[int, str] = "latest", log=print, clips: int = 16,
                     data_dir: str = "") -> List[str]:
  """Writes the training curves and the attention heatmaps of a run; returns the paths.

  What a run does not have (no `metrics.jsonl`, no checkpoint, no GTA or SSA layer,
  no prepared dataset for SSA's clips) is reported through `log` and skipped.
  `clips` and `data_dir` are :func:`load_ssa_maps`'.
  """
  out = paths.path(out)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  metrics_path = paths.path(workdir) / "metrics.jsonl"
  rows = read_metrics(metrics_path) if metrics_path.exists() else []
  if rows:
    path = paths.save_figure(training_curves_figure(rows, paths.name(workdir)),
                             out / CURVES_FILE, dpi=100)
    written.append(os.fspath(path))
  else:
    log(f"no training curves: {metrics_path} is missing or empty")
  try:
    maps, chosen = load_attention_maps(workdir, step)
  except FileNotFoundError as e:
    log(f"no attention maps: {e}")
    return written
  titles = {layer: f"{layer}, step {chosen}" for layer in maps}
  try:
    ssa_maps, _, what = load_ssa_maps(workdir, chosen, clips, data_dir)
  except FileNotFoundError as e:
    ssa_maps = {}
    log(f"no SSA attention maps: {e}")
  maps.update(ssa_maps)
  titles.update({layer: f"{layer}: {what}, step {chosen}" for layer in ssa_maps})
  if not maps:
    log(f"no attention maps: checkpoint {chosen} has no GTA or SSA layer")
  for layer, m in maps.items():
    path = paths.save_figure(attention_figure(layer, m, titles[layer]),
                             out / attention_filename(layer), dpi=100)
    written.append(os.fspath(path))
  return written


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f["verbosity"].present:  # orbax's restore logs, unless asked for
    logging.set_verbosity(logging.ERROR)
  step = cli.checkpoint_step()
  if not paths.path(f.workdir).is_dir():
    print(f"error: --workdir {f.workdir} is not a folder", file=sys.stderr)
    return 1
  note = lambda msg: print(msg, file=sys.stderr)
  written = save_run_figures(f.workdir, f.out, step, log=note, clips=f.clips,
                             data_dir=f.data_dir)
  for path in written:
    print(path)
  if not written:
    note(f"error: nothing to draw in {f.workdir}")
    return 1
  return 0


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_string("out", None, "Where the PNG files go.")
  cli.define_checkpoint_step_flag()
  flags.DEFINE_integer("clips", 16, "Validation clips SSA's M_T is averaged over.",
                       lower_bound=1)
  flags.DEFINE_string("data_dir", "", "Where the run's dataset is prepared, for SSA's "
                      "clips; '' for the run's config.data.data_dir.")
  flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
