"""synthetic_ssa: SSA alone in the tiny synthetic ResNet.

SSA inside res4 and res5 block 0 (scaled, residual), no other temporal module;
see `gta_jax.config_lib.synthetic_config` for the recipe.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_config('ssa')
