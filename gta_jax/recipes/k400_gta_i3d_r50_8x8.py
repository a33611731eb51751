"""k400_gta_i3d_r50_8x8: see `gta_jax.config_lib.k400_3d_config` for the recipe.

The I3D baseline's recipe (`k400_i3d_r50_8x8`), so that the two differ only by the
GTA blocks. No temporal stride: the blocks in res3 and res4 see all 8 frames.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.k400_3d_config(8, 8, 'gta')
