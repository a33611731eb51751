"""k400_i3d_r50_8x8: see `gta_jax.config_lib.k400_3d_config` for the recipe."""

from gta_jax import config_lib


def get_config():
  return config_lib.k400_3d_config(8, 8)
