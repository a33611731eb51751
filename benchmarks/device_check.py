r"""The device check: what a lent GPU or TPU says about this project, in one run.

    python benchmarks/device_check.py             # on the accelerator, < 8 min on one H200
    python benchmarks/device_check.py --smoke     # tiny sizes, any machine (the CI test)

Needs only jax, flax, optax and ml_collections plus the project; it imports no
input-pipeline module (`gta_jax.data` needs cv2, grain and tfds), so its train
step is its own: `gta_jax.training.steps.make_train_step`'s loss and update on
already normalised float clips, without the uint8 normalisation. In order:

1. The PyTorch peer, where torch and torchvision import: `peer_torch.py` times
   torchvision's ResNet-50 TSN train step (channels_last, bf16 autocast) on this
   device in a subprocess, first, while JAX holds no device memory.
2. Attention equality: every implementation this platform has (`custom`, `xla`,
   and `cudnn` on GPU, `pallas` on TPU) against an einsum softmax attention, forward
   and gradients; float32 at `Precision.HIGHEST` to 1e-5 (cuDNN: bf16, to 2e-2).
3. The bf16 matmul rate (n x n), the denominator of MFU.
4. Each attention implementation timed, forward and backward, bf16, on the
   shapes the models give it at 224px (GTA's res4 spatial attention, SSA's res3
   block 0 position attention at 56x56, the 3D Non-local's 8 x 28 x 28 tokens).
5. bf16 train steps of TSN, TSM, GTA and SSA ResNet-50, 8 x 224^2, batch 32 (halved
   until it fits): clips/s, forward GFLOPs per clip (XLA's cost analysis of the
   step lowered with the `xla` attention, whose FLOPs it can count), MFU of the
   train step against (3), and peak device memory.

Prints a line per measurement and, last, one JSON line with everything.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gta_jax import config_lib
from gta_jax.models import attention
from gta_jax.models import backend
from gta_jax.training import state as state_lib
from timing import matmul_gflops  # pylint: disable=g-bad-import-order  (benchmarks/)
from timing import median_seconds  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("tsn", "tsm", "gta", "ssa")
IMPLS = {"cpu": ("custom", "xla"), "gpu": ("custom", "xla", "cudnn"),
         "tpu": ("custom", "xla", "pallas")}
# (name, N, L, D) of the attention timings, full size and --smoke.
ATTENTION_SHAPES = {
    False: (("gta_res4_spatial", 32 * 8, 14 * 14, 128),
            ("ssa_res3_position", 32 * 8, 56 * 56, 128),
            ("nonlocal_3d", 32, 8 * 28 * 28, 128)),
    True: (("tiny", 4, 128, 8),),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny models and shapes (width 8, 4 x 32^2, batch 2)")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--batch", type=int, default=None, help="default 32 (smoke: 2)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
  parser.add_argument("--torch_python", default=sys.executable,
                      help="the interpreter with torch and torchvision for the peer")
  return parser.parse_args(argv)


def log(message):
  print(message, flush=True)


# -- 1. the PyTorch peer -----------------------------------------------------------


def torch_peer(args, batch, frames, crop):
  """peer_torch.py's TSN report on this device, or why there is none."""
  has_torch = subprocess.run(
      [args.torch_python, "-c", "import torch, torchvision"], capture_output=True)
  if has_torch.returncode:
    return {"skipped": "torch/torchvision not importable"}
  device = {"gpu": "cuda"}.get(backend.default_platform(), "cpu")
  cmd = [args.torch_python, os.path.join(REPO, "benchmarks", "peer_torch.py"),
         "--model=tsn", f"--batch={batch}", f"--frames={frames}", f"--crop={crop}",
         "--dtype=bfloat16", "--rounds=0", f"--steps={args.steps}", f"--device={device}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if proc.returncode:
    return {"failed": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


# -- 2. attention equality ---------------------------------------------------------


def reference_attention(q, k, v, scale):
  logits = jnp.einsum("nqd,nkd->nqk", q, k) * scale
  return jnp.einsum("nqk,nkv->nqv", jax.nn.softmax(logits, axis=-1), v)


def attention_equality(platform):
  """Max |error| of each implementation's output and q, k, v gradients."""
  rng = np.random.default_rng(0)
  n, length, d = 2, 256, 64  # lengths the Pallas blocks divide; a cuDNN head size
  q, k, v, cotangent = (jnp.asarray(rng.standard_normal((n, length, d)), jnp.float32)
                        for _ in range(4))
  results = {}
  for impl in IMPLS[platform]:
    dtype, tol = (jnp.bfloat16, 2e-2) if impl == "cudnn" else (jnp.float32, 1e-5)
    cast = lambda a: a.astype(dtype)  # pylint: disable=cell-var-from-loop
    with jax.default_matmul_precision("highest"):
      want, want_vjp = jax.vjp(lambda *a: reference_attention(*a, 1 / 8),
                               *(cast(a).astype(jnp.float32) for a in (q, k, v)))
      got, got_vjp = jax.vjp(lambda *a, i=impl: attention.attend(*a, implementation=i),
                             *(cast(a) for a in (q, k, v)))
      pairs = [(got, want)] + list(zip(got_vjp(cast(cotangent)), want_vjp(cotangent)))
    error = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) /
                      (1 + float(jnp.max(jnp.abs(b))))) for a, b in pairs)
    results[impl] = {"max_rel_error": error, "tolerance": tol, "ok": error <= tol}
    log(f"attention {impl:6s} vs einsum reference: max error {error:.2e} "
        f"({'ok' if error <= tol else 'FAIL'}, tolerance {tol:g})")
  return results


# -- 3. and 4. matmul rate, attention timings ---------------------------------------


def attention_timings(platform, smoke, steps):
  """Milliseconds of forward+backward of each implementation on each shape."""
  results = {}
  for name, n, length, d in ATTENTION_SHAPES[smoke]:
    q = jax.random.normal(jax.random.key(0), (n, length, d), jnp.bfloat16)
    for impl in IMPLS[platform]:
      loss = lambda q, i=impl: jnp.sum(
          attention.attend(q, q, q, implementation=i).astype(jnp.float32))
      grad = jax.jit(jax.grad(loss))
      try:
        ms = 1e3 * median_seconds(lambda: grad(q), steps)  # pylint: disable=cell-var-from-loop
      except Exception as e:  # pylint: disable=broad-except
        ms = f"failed: {type(e).__name__}: {str(e)[:200]}"
      results[f"{name}/{impl}"] = ms
      log(f"attention {name} (N={n}, L={length}, D={d}) {impl}: "
          + (f"{ms:.2f} ms fwd+bwd" if isinstance(ms, float) else ms))
  return results


# -- 5. model train steps ----------------------------------------------------------


def load_config(name, smoke):
  config = config_lib.from_file(os.path.join(REPO, "configs", f"ssv2_{name}_r50_8f.py"))
  config.model.dtype = "bfloat16"
  config.data.num_frames, config.data.crop_size = (4, 32) if smoke else (8, 224)
  if smoke:
    config.model.update(width=8, stage_sizes="1,1,1,1", small_stem=True)
    for module_name in ("gta", "ssa"):
      config.model[module_name].placement = "res4:0"
  return config


def make_train_step(model, tx):
  """`training.steps.make_train_step`'s step on normalised float clips."""

  def step(state, video, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, video, train=True,
          mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(
              jax.random.key(0), state.step)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1,
                         params=optax.apply_updates(state.params, deltas),
                         batch_stats=updates["batch_stats"], opt_state=opt_state), loss

  return jax.jit(step, donate_argnums=0)


def lowered_flops(lowered):
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def model_step(config, batch, steps, peak_gflops):
  """One model's train-step figures at `batch` clips."""
  t, crop = config.data.num_frames, config.data.crop_size
  video = jax.random.normal(jax.random.key(0), (batch, t, crop, crop, 3), jnp.bfloat16)
  labels = jnp.arange(batch) % config.model.num_classes
  model, tx, _, abstract_state = state_lib.build(config)

  # FLOPs of the same model with the `xla` attention, lowered, not compiled:
  # cost analysis cannot see into cuDNN's or Pallas's kernels.
  config.model.attention_impl = "xla"
  counted, _, _, _ = state_lib.build(config)
  forward = jax.jit(lambda v, x: counted.apply(v, x, train=False)).lower(
      abstract_state.variables, video)
  train_flops = lowered_flops(
      make_train_step(counted, tx).lower(abstract_state, video, labels))

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state = state_lib.initial_state(config, model, tx, mesh)  # compiled cheaply on CPU
  compiled = make_train_step(model, tx).lower(state, video, labels).compile()
  holder = [state]

  def call():
    holder[0], loss = compiled(holder[0], video, labels)
    return loss

  seconds = median_seconds(call, steps)
  stats = jax.devices()[0].memory_stats() or {}
  memory = compiled.memory_analysis()
  return {
      "batch": batch,
      "train_step_s": seconds,
      "train_clips_per_s": batch / seconds,
      "gflops_per_clip": lowered_flops(forward) / batch / 1e9,
      "train_gflops_per_clip": train_flops / batch / 1e9,
      "mfu_train": train_flops / seconds / 1e9 / peak_gflops,
      "peak_memory_bytes": stats.get("peak_bytes_in_use"),
      "compiled_memory_bytes": int(memory.argument_size_in_bytes
                                   + memory.output_size_in_bytes
                                   + memory.temp_size_in_bytes
                                   - memory.alias_size_in_bytes),
  }


def model_steps(args, names, peak_gflops):
  results = {}
  for name in names:
    batch = args.batch
    while True:
      try:
        results[name] = model_step(load_config(name, args.smoke), batch, args.steps,
                                   peak_gflops)
        break
      except Exception as e:  # pylint: disable=broad-except
        if "RESOURCE_EXHAUSTED" not in str(e) or batch == 1:
          results[name] = {"batch": batch, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
          break
        batch //= 2
        log(f"{name}: out of memory, batch {batch}")
    r = results[name]
    if "failed" in r:
      log(f"{name}: {r['failed']}")
    else:
      memory = r["peak_memory_bytes"] or r["compiled_memory_bytes"]
      log(f"{name}: batch {r['batch']}, {r['train_step_s']:.3f} s/step, "
          f"{r['train_clips_per_s']:.1f} clips/s, {r['gflops_per_clip']:.1f} GFLOP/clip, "
          f"MFU {100 * r['mfu_train']:.1f}%, peak memory {memory / 2**30:.2f} GiB")
  return results


def main(argv=None):
  args = parse_args(argv)
  args.batch = args.batch or (2 if args.smoke else 32)
  args.steps = args.steps or (2 if args.smoke else 10)
  start = time.perf_counter()
  platform = backend.default_platform()
  device = jax.devices()[0]
  log(f"{platform}: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}")
  frames, crop = (4, 32) if args.smoke else (8, 224)
  report = {"platform": platform, "device": device.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "smoke": args.smoke}
  report["torch_peer"] = torch_peer(args, args.batch, frames, crop)
  report["attention_equality"] = attention_equality(platform)
  report["peak_gflops_bf16"] = matmul_gflops(
      jnp.bfloat16, 256 if args.smoke else 8192, args.steps)
  log(f"bf16 matmul: {report['peak_gflops_bf16']:.0f} GFLOP/s")
  report["attention_ms"] = attention_timings(platform, args.smoke, args.steps)
  report["models"] = model_steps(args, args.models.split(","), report["peak_gflops_bf16"])
  tsn, peer = report["models"].get("tsn", {}), report["torch_peer"]
  if "train_step_s" in tsn and "torch_train_s" in peer and peer.get("batch") == tsn["batch"]:
    report["jax_vs_torch_train"] = peer["torch_train_s"] / tsn["train_step_s"]
    log(f"TSN train step: JAX {tsn['train_step_s']:.3f} s, PyTorch "
        f"{peer['torch_train_s']:.3f} s: JAX x{report['jax_vs_torch_train']:.2f}")
  report["ok"] = all(r["ok"] for r in report["attention_equality"].values())
  report["seconds"] = time.perf_counter() - start
  print(json.dumps(report), flush=True)
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
