r"""Throughput of a config's train and inference steps, against the machine's limits.

    python benchmarks/bench.py --config configs/ssv2_tsn_r50_8f.py --batch 2 \
        --steps 10 --config.data.crop_size=112 [--config.model.dtype=bfloat16]

Builds the config's model, compiles the jitted train step and inference step on
a random clip batch `(batch, T, crop, crop, 3)`, warms them up, then times `--steps`
calls of each, every call synchronised with `jax.block_until_ready`, and reports
medians. Alongside: forward FLOPs per clip from XLA's cost analysis (of the model
without loops: `flops_per_clip`), the float32 (and bfloat16) matmul rate measured
in the same process, the model FLOP utilisation of the train step against that
rate, and the compiled train step's peak memory.

The last line printed is one JSON object (see `REPORT_KEYS`); `peer_torch.py`
parses it. XLA flags come from `XLA_FLAGS` as usual (none of those tried helped on
CPU: see README.md) and are echoed in the report, as is `GLIBC_TUNABLES`: like
`train.py`, this runs with malloc on huge pages (`gta_jax.cli.use_huge_pages`;
`GTA_JAX_HUGE_PAGES=0` to measure without).
"""

import json
import os
import statistics
from typing import Any, Dict, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from gta_jax import cli
from gta_jax.models import registry
from gta_jax.training import optim
from gta_jax.training import state as state_lib
from gta_jax.training import steps as steps_lib
from timing import matmul_gflops  # pylint: disable=g-bad-import-order  (benchmarks/)
from timing import time_calls  # pylint: disable=g-bad-import-order

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_BATCH = flags.DEFINE_integer("batch", None, "Clips per step; default config.batch_size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls of each step (the median is kept).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "n of the n x n peak matmul.")
_SKIP_INFER = flags.DEFINE_bool("skip_infer", False, "Time the train step only.")

REPORT_KEYS = ("config", "batch", "num_frames", "crop_size", "dtype",
               "train_clips_per_s", "infer_clips_per_s", "train_step_s", "infer_step_s",
               "train_step_s_spread", "gflops_per_clip", "train_gflops_per_clip",
               "mfu_train", "peak_gflops", "peak_gflops_bf16", "peak_memory_bytes",
               "backend", "device", "xla_flags", "glibc_tunables")


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def flops_per_clip(config, batch: int, steps: "CompiledSteps") -> Tuple[float, float]:
  """Forward and train-step FLOPs per clip, from XLA's cost analysis.

  Counted on `registry.without_loops(config)`, compiled anew when it differs
  from `config` (`steps` are `config`'s compiled steps): XLA counts a loop's body
  once, and SSA's frame-chunk loop would hide all its chunks but one.
  """
  loop_free = registry.without_loops(config)
  if loop_free != config:
    steps = CompiledSteps(loop_free, batch)
  return (compiled_flops(steps.infer_compiled) / batch,
          compiled_flops(steps.train_compiled) / batch)


def compiled_peak_memory(compiled) -> int:
  """Bytes of a compiled step: arguments, outputs and its temporary buffers.

  XLA's buffer assignment packs the temporaries into `temp_size_in_bytes`, so this
  is the step's peak. (`peak_memory_in_bytes` leaves the temporaries out on CPU.)
  """
  stats = compiled.memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


class CompiledSteps:
  """A config's model, compiled train and inference steps, and a random batch.

  `train()` runs one train step (the state is donated and carried along) and
  returns its metrics; `infer()` runs the inference step on the same clips.
  """

  def __init__(self, config, batch: int):
    t, crop = config.data.num_frames, config.data.crop_size
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.standard_normal((batch, t, crop, crop, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, config.model.num_classes, (batch,)), jnp.int32)
    self.batch = {"video": video, "label": labels}

    model = registry.build_model(config)
    variables = jax.jit(lambda key: state_lib.init_variables(model, config, key))(
        jax.random.key(config.seed))
    tx = optim.make_optimizer(config, variables["params"])
    self.state = jax.jit(lambda v: state_lib.create_train_state(v, tx))(variables)
    train_step = steps_lib.make_train_step(model, tx)  # jitted, state donated
    self.train_compiled = train_step.lower(self.state, self.batch).compile()
    infer_jit = jax.jit(lambda v, x: model.apply(v, x, train=False))
    self.infer_compiled = infer_jit.lower(variables, video).compile()

  def train(self):
    self.state, metrics = self.train_compiled(self.state, self.batch)
    return metrics

  def infer(self):
    return self.infer_compiled(self.state.variables, self.batch["video"])


def run(config, batch: int, steps: int, warmup: int) -> Dict[str, Any]:
  """Compiles and times the steps; returns the report (keys `REPORT_KEYS`)."""
  t, crop = config.data.num_frames, config.data.crop_size
  compiled = CompiledSteps(config, batch)
  train_times = time_calls(compiled.train, steps, warmup)
  infer_times = ([float("nan")] if _SKIP_INFER.value else
                 time_calls(compiled.infer, steps, warmup))

  peak = matmul_gflops(jnp.float32, _MATMUL_SIZE.value)
  train_s, infer_s = statistics.median(train_times), statistics.median(infer_times)
  forward_flops, train_flops = flops_per_clip(config, batch, compiled)
  device = jax.devices()[0]
  return {
      "config": config_name(),
      "batch": batch,
      "num_frames": t,
      "crop_size": crop,
      "dtype": config.model.dtype,
      "train_clips_per_s": batch / train_s,
      "infer_clips_per_s": batch / infer_s,
      "train_step_s": train_s,
      "infer_step_s": infer_s,
      "train_step_s_spread": (min(train_times), max(train_times)),
      "gflops_per_clip": forward_flops / 1e9,
      "train_gflops_per_clip": train_flops / 1e9,
      "mfu_train": train_flops * batch / train_s / 1e9 / peak,
      "peak_gflops": peak,
      "peak_gflops_bf16": matmul_gflops(jnp.bfloat16, _MATMUL_SIZE.value),
      "peak_memory_bytes": compiled_peak_memory(compiled.train_compiled),
      "backend": jax.default_backend(),
      "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }


def config_and_batch():
  """The config of `--config` and the clips per step (`--batch` or its batch_size)."""
  return _CONFIG.value, _BATCH.value or _CONFIG.value.batch_size


def config_name() -> str:
  return os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]


def print_table(report: Dict[str, Any]) -> None:
  rows = [
      ("config", f"{report['config']} ({report['dtype']}, {report['batch']} x "
                 f"{report['num_frames']} x {report['crop_size']}^2)"),
      ("device", f"{report['device']} ({report['backend']})"),
      ("train step", f"{report['train_step_s']:.3f} s median "
                     f"[{report['train_step_s_spread'][0]:.3f}, "
                     f"{report['train_step_s_spread'][1]:.3f}]  "
                     f"{report['train_clips_per_s']:.2f} clips/s"),
      ("inference step", f"{report['infer_step_s']:.3f} s  "
                         f"{report['infer_clips_per_s']:.2f} clips/s"),
      ("forward GFLOP/clip", f"{report['gflops_per_clip']:.2f} "
                             f"(train step {report['train_gflops_per_clip']:.2f})"),
      ("matmul GFLOP/s", f"f32 {report['peak_gflops']:.0f}, "
                         f"bf16 {report['peak_gflops_bf16']:.0f}"),
      ("MFU (train)", f"{100 * report['mfu_train']:.1f}% of the f32 matmul rate"),
      ("peak memory", f"{report['peak_memory_bytes'] / 2**20:.0f} MiB (train step)"),
  ]
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, batch = config_and_batch()
  if batch < 1 or _STEPS.value < 1:
    raise app.UsageError(f"--batch and --steps must be positive, got {batch}, "
                         f"{_STEPS.value}")
  report = run(config, batch, _STEPS.value, _WARMUP.value)
  print_table(report)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
