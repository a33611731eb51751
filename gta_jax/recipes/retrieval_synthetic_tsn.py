"""retrieval_synthetic_tsn: text-video retrieval on the embedded captioned dataset with a
TSN video side; `gta_jax.config_lib.retrieval_synthetic_config` has the recipe.

  python train.py --config configs/retrieval_synthetic_tsn.py --workdir runs/r_tsn
  python eval.py --config configs/retrieval_synthetic_tsn.py --workdir runs/r_tsn
"""

from gta_jax import config_lib


def get_config():
  return config_lib.retrieval_synthetic_config("")
