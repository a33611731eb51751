"""Video networks: ResNet backbones, temporal modules and the model registry."""

from gta_jax.models.registry import build_model
from gta_jax.models.registry import TEMPORAL_MODULES

__all__ = ["build_model", "TEMPORAL_MODULES"]
