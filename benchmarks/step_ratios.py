r"""Does attention cost what its FLOPs say? Train steps of several configs, interleaved.

    python benchmarks/step_ratios.py --configs tsn,gta,ssa --batch 2 --crop 112 --rounds 6

Compiles the train step (`bench.CompiledSteps`; `--batch` and `--warmup` are
bench.py's flags) of each `configs/ssv2_{name}_r50_8f.py` (`--pattern`) in one
process, then calls them in turn, `--rounds` times after a warm-up, so that every
config sees the same machine load; in each round, a config's timed call follows an
untimed one of its own. For each config it prints the median step time, the
forward GFLOPs per clip (`bench.flops_per_clip`: XLA's cost analysis of the
inference step, loops taken out), and, against the first config, the step-time
ratio (of the medians, and the median of each round's ratio: "paired"), the FLOP
ratio and their quotient: issue 8's target is a quotient of at most 1.1
(attention as efficient as the convolutions it is added to). The last line is
JSON.
"""

import ast
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax

import bench  # pylint: disable=g-bad-import-order  (benchmarks/ is the script's dir)
from gta_jax import cli
from gta_jax import config_lib

_CONFIGS = flags.DEFINE_list(
    "configs", ["tsn", "gta", "ssa"],
    "Names X in --pattern; the first is the base. `X:key=value:...` also sets config "
    "keys, e.g. `ssa:model.ssa.spatial_chunk=8:model.ssa.save_probs=False`.")
_PATTERN = flags.DEFINE_string("pattern", "configs/ssv2_{}_r50_8f.py",
                               "Config file of a name, relative to the repository.")
_CROP = flags.DEFINE_integer("crop", 112, "Crop size.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Timed calls of each step, interleaved.")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(entry: str):
  """`get_config()` of the `--pattern` file of `name:key=value:...`, at `--crop`,
  with the keys set (values are Python literals)."""
  name, *overrides = entry.split(":")
  config = config_lib.from_file(os.path.join(REPO, _PATTERN.value.format(name)))
  config.data.crop_size = _CROP.value
  for override in overrides:
    key, _, value = override.partition("=")
    config.update_from_flattened_dict({key: ast.literal_eval(value)})
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batch = flags.FLAGS.batch or 2
  configs = {name: load_config(name) for name in _CONFIGS.value}
  steps = {}
  for name, config in configs.items():
    steps[name] = bench.CompiledSteps(config, batch)
    for _ in range(max(1, flags.FLAGS.warmup)):
      jax.block_until_ready(steps[name].train())
  times = {name: [] for name in steps}
  for _ in range(_ROUNDS.value):
    for name, step in steps.items():
      # A step called right after another config's ran up to 17% slower (two
      # copies of one SSA config at 224px: 4.63 vs 3.97 s, the first one after
      # TSN): an untimed call first.
      jax.block_until_ready(step.train())
      start = time.perf_counter()
      jax.block_until_ready(step.train())
      times[name].append(time.perf_counter() - start)

  base = _CONFIGS.value[0]
  gflops = {name: bench.flops_per_clip(configs[name], batch, s)[0] / 1e9
            for name, s in steps.items()}
  medians = {name: statistics.median(t) for name, t in times.items()}
  report = {"batch": batch, "crop": _CROP.value, "rounds": _ROUNDS.value, "configs": {}}
  print(f"{batch} clips, {_CROP.value}^2, {_ROUNDS.value} interleaved rounds")
  for name in steps:
    step_ratio = medians[name] / medians[base]
    # Each round's ratio to the base's call earlier in the same round: the
    # machine's drift between rounds cancels out.
    paired = statistics.median(t / b for t, b in zip(times[name], times[base]))
    flop_ratio = gflops[name] / gflops[base]
    report["configs"][name] = {
        "train_step_s": medians[name], "spread": (min(times[name]), max(times[name])),
        "gflops_per_clip": gflops[name], "step_ratio": step_ratio,
        "paired_step_ratio": paired, "flop_ratio": flop_ratio,
        "step_over_flop_ratio": step_ratio / flop_ratio}
    print(f"  {name:6s} step {medians[name]:.3f} s [{min(times[name]):.3f}, "
          f"{max(times[name]):.3f}]  {gflops[name]:7.2f} GFLOP/clip  step x{step_ratio:.2f}"
          f" (paired x{paired:.2f})  FLOPs x{flop_ratio:.2f}  "
          f"quotient {step_ratio / flop_ratio:.2f}")
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  cli.run(main)
