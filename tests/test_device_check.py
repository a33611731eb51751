"""benchmarks/device_check.py --smoke: the device check at tiny sizes, on this CPU."""

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the check, then fails if it imported the input pipeline (which a device
# image without cv2, grain and tfds could not).
SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "benchmarks")
    import device_check
    code = device_check.main(["--smoke", "--models=gta"])
    data = [m for m in sys.modules
            if m.startswith("gta_jax.data") or m in ("cv2", "grain", "tensorflow_datasets")]
    assert not data, data
    sys.exit(code)
""")


def test_device_check_smoke_reports_every_section():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["smoke"] and report["platform"] == "cpu" and report["ok"]
  assert set(report["attention_equality"]) == {"custom", "xla"}
  assert all(r["max_rel_error"] <= 1e-5 for r in report["attention_equality"].values())
  assert report["peak_gflops_bf16"] > 0
  assert set(report["attention_ms"]) == {"tiny/custom", "tiny/xla"}
  assert all(isinstance(ms, float) and ms > 0 for ms in report["attention_ms"].values())
  assert set(report["models"]) == {"gta"}  # one model: XLA:CPU compiles slowly
  gta = report["models"]["gta"]
  assert gta["batch"] == 2 and gta["train_clips_per_s"] > 0
  assert 0 < gta["mfu_train"] < 10 and gta["compiled_memory_bytes"] > 0
  # The train step's FLOPs include the backward pass: about 3x the forward's.
  assert 2 < gta["train_gflops_per_clip"] / gta["gflops_per_clip"] < 4
  assert "torch_peer" in report
