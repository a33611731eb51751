"""k400_ssa_r50_8f: SSA-R50, 8 segments; see `gta_jax.config_lib.ssa_recipe`."""

from gta_jax import config_lib


def get_config():
  c = config_lib.k400_config(8, 'ssa')
  config_lib.ssa_recipe(c, epochs=200)
  return c
