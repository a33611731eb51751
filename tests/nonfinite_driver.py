"""`train.py` with non-finite training steps planted at positions of the data stream.

  GTA_JAX_PLANT_NONFINITE=4,9 python tests/nonfinite_driver.py --config ... (train.py's flags)

The step that trains on global batch 4 (or 9) of the data stream returns a NaN loss
and NaN parameters, as a bad batch would. The positions are global, so every process
of a multi-process run plants at the same step; a rollback that skips past a planted
batch never meets it again.
"""

import json
import os

import jax
import jax.numpy as jnp

from gta_jax import tasks
from gta_jax import train
from gta_jax.training import loop

PLANT_ENV = "GTA_JAX_PLANT_NONFINITE"


def plant(positions):
  """Patches the loop so that the steps on batches `positions` turn non-finite."""
  current = {"position": -1}
  next_batch = loop._Run.next_batch  # pylint: disable=protected-access
  make_train_step = tasks.make_train_step

  def recording_next_batch(self):
    current["position"] = json.loads(self.train_iter.get_state())["next_batch"]
    return next_batch(self)

  def poisoning_train_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def poisoned(state, batch):
      state, metrics = step(state, batch)
      if current["position"] in positions:
        nan = jnp.float32(jnp.nan)
        state = state.replace(params=jax.tree.map(lambda p: p * nan, state.params))
        metrics = dict(metrics, loss=metrics["loss"] * nan)
      return state, metrics

    return poisoned

  loop._Run.next_batch = recording_next_batch  # pylint: disable=protected-access
  tasks.make_train_step = poisoning_train_step


if __name__ == "__main__":
  plant({int(p) for p in os.environ[PLANT_ENV].split(",")})
  train.run()
