"""retrieval_synthetic_ssa: text-video retrieval on the embedded captioned dataset with a
SSA video side; `gta_jax.config_lib.retrieval_synthetic_config` has the recipe.

  python train.py --config configs/retrieval_synthetic_ssa.py --workdir runs/r_ssa
  python eval.py --config configs/retrieval_synthetic_ssa.py --workdir runs/r_ssa
"""

from gta_jax import config_lib


def get_config():
  return config_lib.retrieval_synthetic_config("ssa")
