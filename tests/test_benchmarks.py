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
