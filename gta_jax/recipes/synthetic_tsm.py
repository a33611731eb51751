"""synthetic_tsm: see `gta_jax.config_lib.synthetic_config` for the recipe."""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_config('tsm')
