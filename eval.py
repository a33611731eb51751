"""`python eval.py` in a clone of the repository: the command `gta_jax.eval`.

`python eval.py --help` prints its usage and flags, as `python -m gta_jax.eval --help`
and `gta-jax-eval --help` do.
"""

from gta_jax.eval import run

if __name__ == "__main__":
  run()
