"""gta_jax: GTA and SSA temporal attention for video action recognition in JAX/Flax."""

__version__ = "0.1.0"
