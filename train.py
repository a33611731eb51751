"""`python train.py` in a clone of the repository: the command `gta_jax.train`.

`python train.py --help` prints its usage and flags, as `python -m gta_jax.train --help`
and `gta-jax-train --help` do.
"""

from gta_jax.train import run

if __name__ == "__main__":
  run()
