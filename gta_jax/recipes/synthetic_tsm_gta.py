"""synthetic_tsm_gta: GTA on a TSM backbone (shifts in every block).

The same GTA blocks as `configs/synthetic_gta.py`; see
`gta_jax.config_lib.synthetic_config` for the recipe.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_config('tsm,gta')
