"""k400_ssa_r50_16f: SSA-R50, 16 segments; see `gta_jax.config_lib.ssa_recipe`."""

from gta_jax import config_lib
from gta_jax.models import ssa


def get_config():
  c = config_lib.k400_config(16, 'ssa')
  config_lib.ssa_recipe(c, epochs=200)
  c.model.ssa.update(ssa.LEAN_MEMORY_MODE)  # 16 frames: the softmaxes recomputed
  return c
