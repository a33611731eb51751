r"""What BatchNorm's two-pass variance costs: every BN of a model, alone, fwd + bwd.

    python benchmarks/bn_cost.py --config configs/ssv2_tsm_r50_8f.py --batch 2 \
        --config.data.crop_size=112 --rounds 30

Records the input shape of every training-mode BatchNorm of the config's model
(`resnet.TrainingBatchNorm`, found with `nn.intercept_methods`), then times the
forward and backward pass of all of them on random inputs of those shapes, with
the one-pass and with the two-pass variance, the two jitted functions called in
turn `--rounds` times (the order swapped every round). Prints the medians and
their difference, the extra time two passes add to a train step of that model
(docs/baselines.md); the last line is JSON.
"""

import functools
import json
import statistics

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from gta_jax.models import build_model
from gta_jax.models import resnet
from timing import time_calls  # pylint: disable=g-bad-import-order  (benchmarks/)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_BATCH = flags.DEFINE_integer("batch", 2, "Clips per step.")
_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timed calls of each setting, interleaved.")


def batch_norm_shapes(config, batch: int):
  """The input shapes of the model's training-mode BatchNorms, in call order."""
  config.model.dropout_rate = 0.0  # no dropout rng needed to trace
  model = build_model(config)
  t, crop = config.data.num_frames, config.data.crop_size
  video = jnp.zeros((batch, t, crop, crop, 3))
  shapes = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, resnet.TrainingBatchNorm):
      shapes.append(args[0].shape)
    return next_fun(*args, **kwargs)

  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), video)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, video, train=True, mutable=["batch_stats"]),
                   variables)
  return shapes


def all_batch_norms_grad(shapes, two_pass: bool):
  """A jitted gradient, over the inputs, of a loss through one BN per shape."""
  norm = resnet.TrainingBatchNorm(resnet.BatchNormOptions(two_pass_variance=two_pass))
  variables = [norm.init(jax.random.key(0), jnp.zeros(s)) for s in shapes]

  def loss(inputs):
    return sum(jnp.sum(norm.apply(v, x, mutable=["batch_stats"])[0] ** 2)
               for v, x in zip(variables, inputs))

  return jax.jit(jax.grad(loss))


def main(argv):
  del argv
  shapes = batch_norm_shapes(_CONFIG.value, _BATCH.value)
  rng = np.random.default_rng(0)
  inputs = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  grads = {two_pass: all_batch_norms_grad(shapes, two_pass) for two_pass in (True, False)}
  for grad in grads.values():
    time_calls(lambda g=grad: g(inputs), 0, warmup=2)
  times = {True: [], False: []}
  for r in range(_ROUNDS.value):
    for two_pass in ((True, False) if r % 2 else (False, True)):
      times[two_pass] += time_calls(lambda: grads[two_pass](inputs), 1, warmup=0)
  two, one = (statistics.median(times[k]) for k in (True, False))
  values = sum(int(np.prod(s)) for s in shapes)
  print(f"{len(shapes)} BatchNorms, {values / 1e6:.1f}M values: fwd + bwd "
        f"two-pass {two * 1e3:.1f} ms, one-pass {one * 1e3:.1f} ms, "
        f"difference {(two - one) * 1e3:.1f} ms")
  print(json.dumps({"batch_norms": len(shapes), "values": values,
                    "two_pass_s": two, "one_pass_s": one}), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
