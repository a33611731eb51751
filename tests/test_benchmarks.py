"""Smoke test of benchmarks/bench.py: one timed step of a tiny config, in a subprocess."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The keys issue 8 asks of the JSON line (bench.py reports a few more).
REQUIRED = ("train_clips_per_s", "infer_clips_per_s", "gflops_per_clip", "mfu_train",
            "peak_gflops", "peak_memory_bytes", "backend", "device")


def test_bench_reports_positive_finite_numbers():
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"),
         f"--config={os.path.join(REPO, 'configs', 'synthetic_tsn.py')}",
         "--batch=2", "--steps=1", "--warmup=0", "--matmul_size=128",
         "--config.data.num_frames=4", "--config.data.crop_size=16"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  report = json.loads(lines[-1])
  assert set(REQUIRED) <= set(report)
  for key in REQUIRED[:-2]:
    assert isinstance(report[key], (int, float)), key
    assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])
  assert report["backend"] == "cpu"
  assert (report["batch"], report["num_frames"], report["crop_size"]) == (2, 4, 16)
  # Forward FLOPs of the tiny net: at least its stem conv, 2 * T*H*W * 27 * width.
  assert report["gflops_per_clip"] * 1e9 >= 2 * 4 * 16 * 16 * 27 * 8
  assert report["mfu_train"] < 10  # a ratio, not a percentage
  assert any(line.startswith("train step") for line in lines[:-1])  # the table


def test_profile_step_attributes_the_step_to_ops_and_model_parts(tmp_path):
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"),
         f"--trace_dir={tmp_path}",
         f"--config={os.path.join(REPO, 'configs', 'synthetic_tsn.py')}",
         "--batch=2", "--warmup=1", "--profile_steps=1", "--top=5",
         "--config.data.num_frames=4", "--config.data.crop_size=16"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sections = proc.stdout.split("\n\n")
  tables = {s.splitlines()[0]: [r for r in s.splitlines()[1:] if " ms " in r]
            for s in sections[1:4]}
  assert list(tables) == ["by kind of op", "by part of the model", "top 5 ops"]
  share = lambda row: float(row.split("%")[0].split()[-1])
  for rows in tables.values():
    assert len(rows) == 6 and rows[-1].endswith("more)")  # 5 rows, then the rest
    assert [share(r) for r in rows[:-1]] == sorted(map(share, rows[:-1]), reverse=True)
  for name in ("by kind of op", "by part of the model"):
    assert abs(sum(map(share, tables[name])) - 100) < 1
  parts = " ".join(tables["by part of the model"])
  assert "fwd" in parts and "bwd" in parts
  assert proc.stdout.strip().splitlines()[-1] == f"trace: {tmp_path}"


def test_step_ratios_compares_interleaved_steps_with_the_first_config():
  # Two configs (each costs compilations): the base, at bench.py's test sizes above
  # (the session's compilation cache has its steps), and GTA with config overrides.
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "step_ratios.py"),
         "--configs=tsn:data.num_frames=4,gta:data.num_frames=4:model.width=16",
         "--pattern=configs/synthetic_{}.py", "--batch=2", "--crop=16", "--rounds=2",
         "--warmup=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  configs = report["configs"]
  tsn, gta = configs["tsn:data.num_frames=4"], configs["gta:data.num_frames=4:model.width=16"]
  assert (tsn["step_ratio"], tsn["paired_step_ratio"], tsn["flop_ratio"]) == (1.0, 1.0, 1.0)
  # The override doubles the width (8 -> 16): about 4x the FLOPs of the convs, and
  # GTA adds attention on top.
  assert gta["flop_ratio"] > 4
  assert math.isclose(gta["step_ratio"], gta["train_step_s"] / tsn["train_step_s"])
  assert math.isclose(gta["step_over_flop_ratio"], gta["step_ratio"] / gta["flop_ratio"])


def test_flops_per_clip_count_every_chunk_of_the_ssa_loop():
  # SSA's spatial attention runs in a loop over frame chunks, whose body XLA's cost
  # analysis counts once: per-clip FLOPs would then fall as the batch grows.
  def gflops_per_clip(batch):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "flops.py"),
           f"--config={os.path.join(REPO, 'configs', 'synthetic_ssa.py')}",
           f"--batch={batch}", "--config.data.num_frames=4",
           "--config.data.crop_size=32", "--config.model.ssa.spatial_chunk=2",
           "--config.model.ssa.save_probs=False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["gflops_per_clip"]

  assert math.isclose(gflops_per_clip(1), gflops_per_clip(4), rel_tol=1e-2)
