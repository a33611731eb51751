r"""Parameters and forward GFLOPs per clip of a config's model (XLA cost analysis).

    python benchmarks/flops.py --config configs/ssv2_gta_r50_8f.py \
        [--config.data.crop_size=224] [--batch 1]

Nothing is run or initialised: the variables are abstract (`jax.eval_shape`), and
the jitted inference apply on `(batch, T, crop, crop, 3)` clips is lowered and
compiled for `cost_analysis()`, with any loop in the model taken out first
(`registry.without_loops`: XLA counts a loop's body once). XLA counts a
multiply-add as 2 FLOPs; the papers' ResNet "GFLOPs" are usually multiply-adds
(TSN R50 8f: 33G), half of XLA's count, so both are printed. The last line is one
JSON object.
"""

import json
from typing import Any, Dict

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from gta_jax.models import registry
from gta_jax.models import resnet

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_BATCH = flags.DEFINE_integer("batch", 1, "Clips in the compiled batch.")


def count_params(params: Any) -> Dict[str, int]:
  """Total parameters, and those inside the temporal modules' hook points."""
  flat = flax.traverse_util.flatten_dict(params)
  sizes = {path: int(np.prod(value.shape)) for path, value in flat.items()}
  temporal = sum(size for path, size in sizes.items()
                 if set(path) & set(resnet.HOOK_POSITIONS))
  return {"params": sum(sizes.values()), "temporal_params": temporal}


def measure(config, batch: int) -> Dict[str, Any]:
  """Parameter counts and forward FLOPs per clip of `config`'s model."""
  t, crop = config.data.num_frames, config.data.crop_size
  video = jax.ShapeDtypeStruct((batch, t, crop, crop, 3), jnp.float32)
  model = registry.build_model(registry.without_loops(config))
  variables = jax.eval_shape(model.init, jax.random.key(0), video)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flops = float(apply.lower(variables, video).compile().cost_analysis()["flops"])
  return {"num_frames": t, "crop_size": crop, "batch": batch,
          **count_params(variables["params"]),
          "gflops_per_clip": flops / batch / 1e9,
          "gmacs_per_clip": flops / batch / 2e9}


def main(argv):
  del argv
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  report = {"config": path, **measure(_CONFIG.value, _BATCH.value)}
  print(f"{report['config']}: {report['num_frames']}x{report['crop_size']}^2 clip, "
        f"{report['params'] / 1e6:.2f}M params ({report['temporal_params'] / 1e6:.2f}M "
        f"in temporal modules), {report['gflops_per_clip']:.1f} GFLOPs per clip "
        f"({report['gmacs_per_clip']:.1f} G multiply-adds)")
  print(json.dumps(report))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
