"""retrieval_synthetic_gta: text-video retrieval on the embedded captioned dataset with a
GTA video side; `gta_jax.config_lib.retrieval_synthetic_config` has the recipe.

  python train.py --config configs/retrieval_synthetic_gta.py --workdir runs/r_gta
  python eval.py --config configs/retrieval_synthetic_gta.py --workdir runs/r_gta
"""

from gta_jax import config_lib


def get_config():
  return config_lib.retrieval_synthetic_config("gta")
