"""SSA-R50 against TSN-R50: parameters, forward FLOPs, training-step memory and
subnormal floats in SSA's unscaled softmaxes.

  python benchmarks/ssa_memory.py                      # everything, 8 frames, 224px
  python benchmarks/ssa_memory.py --parts=memory --batch=8 --variants=ssa,ssa_lean,ssa_lean_nochunk

Parts:
* `cost`: parameters and forward GFLOPs per clip (XLA's cost analysis of the
  compiled `model.apply`, eval mode, batch 1) of `ssv2_tsn_r50_8f` and
  `ssv2_ssa_r50_8f`.
* `memory`: the compiled peak memory of one training step (forward, backward and an
  SGD Nesterov + weight decay update, state donated) at `--batch` clips. Only
  compiled, never run: the numbers are XLA's buffer assignment for the backend in
  use (CPU here unless a GPU/TPU is attached); other backends fuse and schedule
  differently.
* `subnormal`: runs SSA-R50 (random init, random clip) forward, recomputes the
  softmax weights of every SSA module from its captured q, k, q^ and k^ in float64
  and counts those that float32 stores as subnormal (0 < p < 1.18e-38) or flushes
  to zero, for `scale='none'` (the paper) and `'sqrt_d'` (BatchNorm in training mode,
  so the random-init activations are normalised); and checks whether the
  backend flushes subnormals itself.
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gta_jax import config_lib
from gta_jax.models import build_model
from gta_jax.models import registry
from gta_jax.models import ssa

TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
ZERO_BELOW = float(np.finfo(np.float32).smallest_subnormal) / 2  # rounds to 0


# SSA variants: overrides of config.model.ssa (`ssa` is the default config, the
# fast memory mode).
SSA_VARIANTS = {
    "ssa": {},
    "ssa_lean": ssa.LEAN_MEMORY_MODE,
    "ssa_lean_nochunk": {**ssa.LEAN_MEMORY_MODE, "spatial_chunk": 0},
}


def get_config(variant: str, num_frames: int):
  """`tsn` or one of :data:`SSA_VARIANTS`, on SSv2 (174 classes)."""
  if variant == "tsn":
    return config_lib.ssv2_config(num_frames)
  config = config_lib.ssv2_config(num_frames, "ssa")
  config_lib.ssa_recipe(config, epochs=80)
  config.model.ssa.update(SSA_VARIANTS[variant])
  return config


def abstract_variables(model, clip_shape):
  return jax.eval_shape(functools.partial(model.init, train=False),
                        jax.random.key(0), jax.ShapeDtypeStruct(clip_shape, jnp.float32))


def cost(variant, num_frames, size):
  # XLA's cost analysis counts a loop body once: no lax.map over frame chunks.
  model = build_model(registry.without_loops(get_config(variant, num_frames)))
  clip = jax.ShapeDtypeStruct((1, num_frames, size, size, 3), jnp.float32)
  variables = abstract_variables(model, clip.shape)
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  compiled = jax.jit(functools.partial(model.apply, train=False)).lower(
      variables, clip).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return {"variant": variant, "params_M": params / 1e6,
          "forward_GFLOPs_per_clip": analysis["flops"] / 1e9}


def train_step_memory(variant, num_frames, size, batch):
  config = get_config(variant, num_frames)
  model = build_model(config)
  clip_shape = (batch, num_frames, size, size, 3)
  variables = abstract_variables(model, clip_shape)
  tx = optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                   optax.sgd(0.01, momentum=0.9, nesterov=True))
  opt_state = jax.eval_shape(tx.init, variables["params"])

  def step(params, batch_stats, opt_state, clips, labels):
    def loss_fn(p):
      logits, new_state = model.apply(
          {"params": p, "batch_stats": batch_stats}, clips, train=True,
          rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_state["batch_stats"]
    grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state

  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      variables["params"], variables["batch_stats"], opt_state,
      jax.ShapeDtypeStruct(clip_shape, jnp.float32),
      jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
  stats = compiled.memory_analysis()
  gib = lambda n: n / 2**30
  # Live at once: the arguments, the temporaries and the outputs that do not reuse
  # a donated argument's buffer.
  total = (stats.argument_size_in_bytes + stats.temp_size_in_bytes
           + stats.output_size_in_bytes - stats.alias_size_in_bytes)
  return {"variant": variant, "batch": batch, "frames": num_frames, "size": size,
          "peak_GiB": gib(total), "temp_GiB": gib(stats.temp_size_in_bytes),
          "argument_GiB": gib(stats.argument_size_in_bytes),
          "output_GiB": gib(stats.output_size_in_bytes),
          "alias_GiB": gib(stats.alias_size_in_bytes),
          "backend_peak_GiB": gib(stats.peak_memory_in_bytes),
          "backend": jax.default_backend()}


def _softmax64(logits):
  logits = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(axis=-1, keepdims=True)


def _count(weights, counts):
  counts["total"] += weights.size
  counts["subnormal"] += int(np.sum((weights >= ZERO_BELOW) & (weights < TINY)))
  counts["zero"] += int(np.sum(weights < ZERO_BELOW))


def subnormals(num_frames, size, scale):
  """Counts float32-subnormal softmax weights in every SSA module of SSA-R50."""
  config = get_config("ssa", num_frames)
  config.model.ssa.scale = scale
  model = build_model(config)
  clip = jax.random.normal(jax.random.key(0), (1, num_frames, size, size, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), clip)
  # Training mode: BatchNorm normalises with the batch's statistics (the running
  # ones are not trained yet); dropout acts after the SSA modules.
  _, state = jax.jit(functools.partial(
      model.apply, train=True, capture_intermediates=True,
      rngs={"dropout": jax.random.key(2)},
      mutable=["intermediates", "batch_stats"]))(variables, clip)
  report = {}
  for block, tree in state["intermediates"].items():
    if "inner" not in tree:
      continue
    inner = tree["inner"]
    q, k = (np.asarray(inner[n]["__call__"][0], np.float64)[0] for n in ("query", "key"))
    qk_hat = np.asarray(inner["temporal_conv"]["__call__"][0], np.float64)[0]
    t, h, w, c = q.shape
    s = lambda d: 1.0 if scale == "none" else d ** -0.5
    branches = {name: dict(total=0, subnormal=0, zero=0)
                for name in ("position", "channel", "temporal")}
    for f in range(t):  # one frame at a time: the HW x HW matrix is large
      qf, kf = q[f].reshape(h * w, c), k[f].reshape(h * w, c)
      _count(_softmax64(qf @ kf.T * s(c)), branches["position"])
      _count(_softmax64(qf.T @ kf * s(h * w)), branches["channel"])
    q_hat, k_hat = qk_hat[..., :c].reshape(t, -1), qk_hat[..., c:2 * c].reshape(t, -1)
    _count(_softmax64(q_hat @ k_hat.T * s(h * w * c)), branches["temporal"])
    report[f"{block} ({h}x{w}x{c})"] = {
        name: {**b, "subnormal_frac": b["subnormal"] / b["total"],
               "zero_frac": b["zero"] / b["total"]}
        for name, b in branches.items()}
  return report


def backend_flushes_subnormals():
  x = jnp.full((4,), 1e-39, jnp.float32)  # a float32 subnormal
  return bool(jnp.all(jax.jit(lambda a: a * 1.5)(x) == 0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="cost,memory,subnormal")
  parser.add_argument("--variants", default="tsn,ssa,ssa_lean,ssa_lean_nochunk")
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--subnormal_size", type=int, default=224)
  args = parser.parse_args()
  parts, variants = args.parts.split(","), args.variants.split(",")
  print(json.dumps({"backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]}))
  if "cost" in parts:
    for variant in ("tsn", "ssa"):
      print(json.dumps(cost(variant, args.frames, args.size)), flush=True)
  if "memory" in parts:
    for variant in variants:
      print(json.dumps(train_step_memory(variant, args.frames, args.size, args.batch)),
            flush=True)
  if "subnormal" in parts:
    print(json.dumps({"backend_flushes_subnormals": backend_flushes_subnormals()}))
    for scale in ("none", "sqrt_d"):
      print(json.dumps({"scale": scale, "size": args.subnormal_size,
                        "modules": subnormals(args.frames, args.subnormal_size, scale)}),
            flush=True)


if __name__ == "__main__":
  main()
