"""ssv2_gta_r50_8f: see `gta_jax.config_lib.ssv2_config` for the recipe.

GTA's own recipe is unknown (only its abstract could be read): TSM's is used.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.ssv2_config(8, 'gta')
