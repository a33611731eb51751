"""k400_tsm_r50_8f: see `gta_jax.config_lib.k400_config` for the recipe."""

from gta_jax import config_lib


def get_config():
  return config_lib.k400_config(8, 'tsm')
