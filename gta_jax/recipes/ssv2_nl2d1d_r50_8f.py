"""ssv2_nl2d1d_r50_8f: SSAN's 2D+1D Non-local baseline (spatial then temporal
Non-local blocks) at SSA's places, with SSA's recipe (`config_lib.ssa_recipe`)."""

from gta_jax import config_lib


def get_config():
  c = config_lib.ssv2_config(8, 'nl')
  c.model.nl.kind = '2d+1d'
  c.model.nl.placement = c.model.ssa.placement
  config_lib.ssa_recipe(c, epochs=80)
  return c
