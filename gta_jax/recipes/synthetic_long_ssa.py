"""synthetic_long_ssa: SSA alone (inside res4 and res5 block 0) on the second
embedded task.

`synthetic_long` (long-range order, relations between objects): see
`gta_jax.config_lib.synthetic_long_config` and docs/ablations.md.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_long_config('ssa')
