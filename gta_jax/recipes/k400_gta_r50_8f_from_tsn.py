"""k400_gta_r50_8f_from_tsn: GTA-R50, 8 segments, from mmaction2's Kinetics-400 TSN-R50.

See `gta_jax.recipes._mmaction2.finetune_from`. Convert the checkpoint first, into
`runs/mmaction2_tsn_r50_k400` (docs/pretrained.md, "Video checkpoints"), or
pass another run with `--config.init_from=DIR`.
"""

from gta_jax.recipes import _mmaction2


def get_config():
  return _mmaction2.finetune_from("gta", "tsn")
