"""synthetic_gta: GTA alone in the tiny synthetic ResNet (README's main job).

A GTA block after res4 block 0, no other temporal module; the recipe and
GTA's settings for it are in `gta_jax.config_lib.synthetic_config`.
`configs/synthetic_tsm_gta.py` adds TSM's shifts.
"""

from gta_jax import config_lib


def get_config():
  return config_lib.synthetic_config('gta')
