"""youcook2_ssa_r50_retrieval: YouCook2 (validation clips) text-video retrieval with a
frozen SSA-R50 video side from a Kinetics-400 run; `gta_jax.config_lib.retrieval_config`.

  python train.py --config configs/youcook2_ssa_r50_retrieval.py --workdir W \
      --config.data.manual_dir=YOUCOOK2 --config.init_from=K400_SSA_RUN \
      --config.text.word_vectors=GoogleNews-vectors-negative300.bin
"""

from gta_jax import config_lib


def get_config():
  return config_lib.retrieval_config("youcook2")
