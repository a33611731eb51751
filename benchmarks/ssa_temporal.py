r"""How saturated a trained SSA's temporal attention `M_T` is, on validation clips.

    python benchmarks/ssa_temporal.py --workdir=/tmp/ablations/ssa_seed0 \
        --row=ssa [--step=latest] [--clips=32] [--data_dir=./data]

Restores the checkpoint of `--workdir` (a run of the row `--row` of
`benchmarks/ablations.py`, whose config it rebuilds), runs its first `--clips`
validation clips through the model in eval mode, and, for each SSA module, from
the captured `q_hat, k_hat` of its temporal conv, prints per layer: the spread of
M_T's content logits (`ssa.temporal_logits`: dot products or scaled cosines, no
bias or mask), the mean of each row's largest weight of `softmax(logits [+ bias])`,
the fraction of rows whose largest weight is above 0.99 (one-hot rows: a softmax
there passes almost no gradient to q_hat and k_hat), and, per head, the frame most
rows pick ('first', 'last' or 'varies'). A dot product over a head's H*W*C/heads
numbers grows with the square of the features' magnitude: docs/ssa.md, "The
saturated M_T".
"""

import functools
import os

from absl import app
from absl import flags
import jax
import numpy as np
import run_cache

import ablations
from gta_jax.data import pipeline
from gta_jax.models import build_model
from gta_jax.models import ssa
from gta_jax.training import checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.",
                               required=True)
_ROW = flags.DEFINE_string("row", "ssa", "The row of benchmarks/ablations.py it ran.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint step, 'latest' or 'best'.")
_CLIPS = flags.DEFINE_integer("clips", 32, "Validation clips to run.")

ONE_HOT = 0.99  # a row of M_T whose largest weight is above this counts as one-hot


def layer_stats(params, q_hat, k_hat, weights, module) -> dict:
  """M_T statistics of one SSA layer from its `(B, T, H, W, C)` q_hat and k_hat and
  the `(B, heads, T, T)` weights `M_T` it sowed (`ssa.WEIGHTS`)."""
  b, t, h, w, c = q_hat.shape
  heads = module.temporal_heads
  clips = lambda a: a.reshape(b, t, h * w, heads, c // heads).transpose(
      0, 3, 1, 2, 4).reshape(b * heads, t, -1)
  cosine_scale = None
  if module.temporal_cosine_scale:
    cosine_scale = ssa.bounded_cosine_scale(params["temporal_log_scale"])
  logits = np.asarray(ssa.temporal_logits(
      clips(q_hat), clips(k_hat), scale=module.scale,
      logit_cap=module.temporal_logit_cap, cosine_scale=cosine_scale), np.float64)
  weights = np.asarray(weights)
  largest = weights.max(-1)
  picks = weights.argmax(-1).transpose(1, 0, 2).reshape(heads, -1)  # head, rows
  def favourite(rows):
    share = lambda frame: np.mean(rows == frame)
    return ("first" if share(0) > 0.9 else "last" if share(t - 1) > 0.9 else "varies")
  return dict(logit_abs_max=float(np.abs(logits).max()), logit_std=float(logits.std()),
              mean_largest_weight=float(largest.mean()),
              one_hot_rows=float(np.mean(largest > ONE_HOT)),
              heads_pick=[favourite(rows) for rows in picks])


def temporal_report(config, variables, video) -> dict:
  """`{block: layer_stats}` of every SSA module of `config`'s model on `video`."""
  if config.model.ssa.temporal_norm not in ("softmax", "softmax-identity"):
    raise ValueError(f"config.model.ssa.temporal_norm={config.model.ssa.temporal_norm!r} "
                     "masks M_T, which this script does not reproduce")
  model = build_model(config)
  module = ssa.build(config.model.ssa, np.float32)()
  _, state = jax.jit(functools.partial(
      model.apply, train=False, capture_intermediates=True,
      mutable=["intermediates"]))(variables, video)
  report = {}
  for block, tree in sorted(state["intermediates"].items()):
    if "inner" not in tree or "temporal_conv" not in tree["inner"]:
      continue
    qk_hat = np.asarray(tree["inner"]["temporal_conv"]["__call__"][0], np.float32)
    c = qk_hat.shape[-1] // (2 if module.shared_value else 3)
    report[block] = layer_stats(variables["params"][block]["inner"],
                                qk_hat[..., :c], qk_hat[..., c:2 * c],
                                tree["inner"][ssa.WEIGHTS][0], module)
  return report


def main(argv):
  del argv
  config_name, overrides, _ = ablations.ROWS[_ROW.value]
  config = run_cache.load_config(config_name, overrides)
  config.data.data_dir = flags.FLAGS.data_dir  # ablations.py's flag
  config.data.num_workers = 0
  step = int(_STEP.value) if _STEP.value.isdigit() else _STEP.value
  variables, step = checkpoint.restore_variables(config, _WORKDIR.value, step)
  config.eval.batch_size = _CLIPS.value
  loader = pipeline.make_eval_loader(config, config.data.eval_split, process_index=0,
                                     process_count=1)
  video = next(iter(loader))["video"][:, 0]  # the first view of each clip
  print(f"{os.path.basename(os.path.normpath(_WORKDIR.value))} step {step}, "
        f"{video.shape[0]} validation clips (row {_ROW.value})")
  print("| block | content logits: max abs | std | mean largest weight | "
        f"rows above {ONE_HOT} | heads' favourite frame |")
  print("|---|---|---|---|---|---|")
  for block, s in temporal_report(config, variables, video).items():
    print(f"| {block} | {s['logit_abs_max']:.3g} | {s['logit_std']:.3g} | "
          f"{s['mean_largest_weight']:.3f} | {s['one_hot_rows']:.2f} | "
          f"{', '.join(s['heads_pick'])} |")


if __name__ == "__main__":
  app.run(main)
