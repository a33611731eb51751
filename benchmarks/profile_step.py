r"""Where a config's train step spends its time, op by op (XLA:CPU and GPU).

    python benchmarks/profile_step.py --config configs/ssv2_tsn_r50_8f.py --batch 2 \
        --config.data.crop_size=112 [--profile_steps 2] [--top 20]

Compiles the train step as `bench.py` does (same flags: `--config`, `--batch`,
`--warmup`, `--config.*`), runs `--profile_steps` steps under `jax.profiler`, and
reads the Perfetto trace back: every executed HLO op (a fusion, a library call
such as a YNNPACK matmul or convolution, a copy) is one event. Each op is matched
to the compiled HLO for its shape and its `op_name`, the JAX-level path that made
it (e.g. `transpose(jvp(VideoResNet))/res3_block0/inner/...`: the backward pass
of the SSA in res3 block 0). Prints, per step:

1. time by kind of op (`ynn_fusion:convolution`, `transpose_copy_fusion`, ...);
2. time by part of the model and pass (`res3_block0/inner bwd`, `stem fwd`, ...);
3. the most expensive ops with shape and path.

Each table lists `--top` rows and sums the rest.

Ops can overlap on several threads, so the sums are CPU time, near the wall time
of the step on a 2-core machine. The trace itself stays in `--trace_dir` for
Perfetto (ui.perfetto.dev) or TensorBoard. Profiling adds some overhead: take
step times from `bench.py`, shares from here.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Tuple

from absl import app
from absl import flags
import jax

import bench  # pylint: disable=g-bad-import-order  (benchmarks/ is the script's dir)
from gta_jax import cli

_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Train steps in the trace.")
_TOP = flags.DEFINE_integer("top", 20, "Rows of each table (the rest is summed).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None,
                                 "Where the trace goes; default a new temporary dir.")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (.*)$")
_PART = re.compile(r"^(stem_\w+|res\d+_block\d+|head)$")
_HOOKS = ("pre", "inner", "post")
_CONTROL_FLOW = ("while", "conditional", "call")


class HloOp(NamedTuple):
  shape: str
  op_name: str  # the JAX path in the op's metadata, '' when XLA kept none
  kind: str


def parse_hlo(text: str) -> Dict[str, HloOp]:
  """Instruction name -> shape, op_name and kind, from compiled HLO text.

  A fusion takes the last op_name found in its fused computation when it has
  none of its own; a library fusion (`ynn_fusion`, ...) is labelled with the
  convolution, dot or reduction inside it.
  """
  computations, current = {}, None
  instructions = {}
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      current.append(line)
      instructions[match.group(1)] = (match.group(2), match.group(3))

  ops = {}
  for name, (shape, rest) in instructions.items():
    op_name = re.search(r'op_name="([^"]+)"', rest)
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = computations.get(called.group(1), []) if called else []
    if not op_name:
      inner = [m for m in (re.search(r'op_name="([^"]+)"', l) for l in body) if m]
      op_name = inner[-1] if inner else None
    kind = re.sub(r"\.\d+$", "", name)
    if kind.startswith(("ynn_", "xnn_", "onednn_")):
      core = next((c for c in ("convolution", "dot", "reduce")
                   if any(f" {c}(" in l for l in body)), None)
      kind += f":{core}" if core else ""
    ops[name] = HloOp(shape, op_name.group(1) if op_name else "", kind)
  return ops


def model_part(op_name: str) -> str:
  """`res3_block0/inner bwd`-style label of an op_name; `other` outside the model."""
  parts = op_name.split("/")
  direction = "bwd" if "transpose(" in op_name else "fwd"
  for i, part in enumerate(parts):
    if _PART.match(part):
      label = part
      if i + 1 < len(parts) and parts[i + 1] in _HOOKS:
        label += "/" + parts[i + 1]
      return f"{label} {direction}"
  if not op_name:
    return "(no op_name: XLA-made op)"
  return "optimizer, loss, other" if "VideoResNet" not in op_name else f"model {direction}"


def read_trace(trace_dir: str) -> List[Tuple[str, float]]:
  """(event name, duration in s) of every complete event in the Perfetto trace."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [(e["name"], e["dur"] * 1e-6) for e in events
          if e.get("ph") == "X" and "dur" in e]


def summarise(events: Iterable[Tuple[str, float]], ops: Dict[str, HloOp], steps: int):
  """Seconds per step by kind, by model part, and per op (HLO ops only)."""
  by_kind, by_part, by_op = (collections.Counter() for _ in range(3))
  for name, seconds in events:
    if name not in ops or ops[name].kind in _CONTROL_FLOW:
      continue  # runtime events (executor, Python), or loops that enclose their ops
    by_kind[ops[name].kind] += seconds / steps
    by_part[model_part(ops[name].op_name)] += seconds / steps
    by_op[name] += seconds / steps
  return by_kind, by_part, by_op


def print_table(title: str, rows: List[Tuple[str, float]], total: float,
                limit: int) -> None:
  """Prints the first `limit` rows (largest first) and the rest as one row."""
  print(f"\n{title}")
  rest = rows[limit:]
  if rest:
    rows = rows[:limit] + [(f"({len(rest)} more)", sum(s for _, s in rest))]
  for label, seconds in rows:
    print(f"  {1e3 * seconds:9.1f} ms  {100 * seconds / total:5.1f}%  {label}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, batch = bench.config_and_batch()
  steps = bench.CompiledSteps(config, batch)
  for _ in range(max(1, flags.FLAGS.warmup)):
    jax.block_until_ready(steps.train())

  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(_PROFILE_STEPS.value):
    jax.block_until_ready(steps.train())
  jax.profiler.stop_trace()

  ops = parse_hlo(steps.train_compiled.as_text())
  by_kind, by_part, by_op = summarise(read_trace(trace_dir), ops, _PROFILE_STEPS.value)
  total = sum(by_op.values())
  print(f"{bench.config_name()}: {batch} x {config.data.num_frames} x "
        f"{config.data.crop_size}^2, {config.model.dtype}; HLO ops {1e3 * total:.1f} ms "
        f"per step ({_PROFILE_STEPS.value} steps traced)")
  top = _TOP.value
  print_table("by kind of op", by_kind.most_common(), total, top)
  print_table("by part of the model", by_part.most_common(), total, top)
  hooks = sum(s for part, s in by_part.items() if part.split()[0].endswith(_HOOKS))
  print(f"  temporal modules ({'/'.join(_HOOKS)} hooks): {1e3 * hooks:.1f} ms, "
        f"{100 * hooks / total:.1f}%")
  print_table(f"top {top} ops", [
      (f"{name}  {ops[name].shape}  {ops[name].op_name.split('/', 1)[-1][-90:]}", s)
      for name, s in by_op.most_common()], total, top)
  print(f"\ntrace: {trace_dir}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
