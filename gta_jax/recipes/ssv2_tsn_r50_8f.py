"""ssv2_tsn_r50_8f: see `gta_jax.config_lib.ssv2_config` for the recipe."""

from gta_jax import config_lib


def get_config():
  return config_lib.ssv2_config(8)
