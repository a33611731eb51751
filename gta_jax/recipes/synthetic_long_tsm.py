"""synthetic_long_tsm: TSM's shift in every block on the second embedded task.

`synthetic_long` (long-range order, relations between objects): see
`gta_jax.config_lib.synthetic_long_config` and docs/ablations.md.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_long_config('tsm')
