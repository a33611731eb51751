"""synthetic_ssa: SSA (scaled, residual) on a TSM backbone.

See `gta_jax.config_lib.synthetic_config` for the recipe.

Like `synthetic_gta.py`: on this data SSA alone learns slowly (README, "Results");
`--config.model.temporal_modules=ssa` trains it without the shifts.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_config('tsm,ssa')
