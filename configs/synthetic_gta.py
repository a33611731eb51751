"""synthetic_gta: GTA on a TSM backbone; see `gta_jax.config_lib.synthetic_config`.

GTA's temporal attention mixes each position's spatially attended features over time:
it sees *that* a frame changed, while the shifts let the convolutions see *where* the
object went. On this data GTA alone learns translations slowly (README, "Results");
`--config.model.temporal_modules=gta` trains it without the shifts.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_config('tsm,gta')
