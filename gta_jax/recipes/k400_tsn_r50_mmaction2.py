"""k400_tsn_r50_mmaction2: see `gta_jax.recipes._mmaction2.tsn_r50`.

mmaction2's model, for its Kinetics-400 checkpoints (`python -m gta_jax.convert
--source=mmaction2`, docs/pretrained.md "Video checkpoints").
"""

from gta_jax.recipes import _mmaction2


def get_config():
  return _mmaction2.tsn_r50()
