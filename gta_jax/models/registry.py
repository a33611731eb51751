"""Builds a model from a config: `build_model(config) -> flax module`.

`config.model` names the backbone (`arch`, `depth`, ...) and a comma-separated list
of `temporal_modules`, each configured under `config.model.<name>` (see
:data:`TEMPORAL_MODULES`). An empty list is TSN.
"""

import copy
from typing import Dict, Tuple

import jax.numpy as jnp
import ml_collections

from gta_jax.models import backend
from gta_jax.models import baselines
from gta_jax.models import gta
from gta_jax.models import hooks
from gta_jax.models import resnet
from gta_jax.models import ssa

# depth -> (blocks per stage, bottleneck blocks)
DEPTHS: Dict[int, Tuple[Tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
ARCHS = ("resnet2d", "resnet3d")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

TEMPORAL_MODULES: Dict[str, hooks.TemporalModuleSpec] = {
    "tsm": baselines.TSM_SPEC,
    "nl": baselines.NONLOCAL_SPEC,
    "gta": gta.GTA_SPEC,
    "ssa": ssa.SSA_SPEC,
}


def _choice(value, allowed, key: str):
  if value not in allowed:
    raise ValueError(f"{key} must be one of {tuple(allowed)}, got {value!r}")
  return value


def stage_sizes(model_config: ml_collections.ConfigDict) -> Tuple[int, ...]:
  """Blocks per stage: `model.stage_sizes` ('1,2,2,1') if set, else from the depth."""
  _choice(model_config.depth, DEPTHS, "config.model.depth")
  if not model_config.stage_sizes:
    return DEPTHS[model_config.depth][0]
  try:
    sizes = tuple(int(n) for n in model_config.stage_sizes.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 4 or min(sizes) < 1:
    raise ValueError("config.model.stage_sizes must be four positive integers such "
                     f"as '1,2,2,1' (or '' for the depth's), got "
                     f"{model_config.stage_sizes!r}")
  return sizes


def temporal_module_names(model_config: ml_collections.ConfigDict) -> Tuple[str, ...]:
  """The names in `model.temporal_modules`, checked against the registry."""
  names = tuple(n.strip() for n in model_config.temporal_modules.split(",") if n.strip())
  for name in names:
    _choice(name, TEMPORAL_MODULES, "each name in config.model.temporal_modules")
  return names


def build_hooks(model_config: ml_collections.ConfigDict, sizes, dtype):
  """`((stage, block, position), factory)` pairs for every placed temporal module."""
  placed = {}
  for name in temporal_module_names(model_config):
    spec = TEMPORAL_MODULES[name]
    module_config = model_config[name]
    factory = spec.build(module_config, dtype)
    key = f"config.model.{name}.placement"
    for stage, block in hooks.parse_placement(module_config.placement, sizes, key=key):
      slot = (stage, block, spec.position)
      if slot in placed:
        raise ValueError(
            f"{key}: res{stage + 2} block {block} already has a '{spec.position}' "
            f"module ({placed[slot][0]}); two modules cannot share a hook point")
      placed[slot] = (name, factory)
  return tuple((slot, factory) for slot, (_, factory) in sorted(placed.items()))


def build_model(config: ml_collections.ConfigDict):
  """Builds the model of `config.task`: the video classifier `config.model`
  describes, or for `task='retrieval'` the text-video model
  (`gta_jax.retrieval.model`) around it.

  Args:
    config: the whole experiment config (`config.model` and `config.data.num_frames`).

  Returns:
    A flax module. A classifier's `apply(variables, video, train=bool)` maps
    `(B, T, H, W, 3)` normalised clips to `(B, num_classes)` logits.

  Raises:
    ValueError: naming the config key at fault and what is allowed.
  """
  if config.get("task", "classification") == "retrieval":
    from gta_jax.retrieval import model as retrieval_model  # pylint: disable=g-import-not-at-top
    return retrieval_model.build_model(config)
  m = config.model
  if not isinstance(m.num_classes, int) or m.num_classes < 1:
    raise ValueError(f"config.model.num_classes must be a positive int, got "
                     f"{m.num_classes!r}")
  return build_video_network(config, m.num_classes)


def build_video_network(config: ml_collections.ConfigDict,
                        num_classes: int) -> resnet.VideoResNet:
  """The video network of `config.model` with `num_classes` outputs (0: the pooled
  features, no classifier)."""
  m = config.model
  arch = _choice(m.arch, ARCHS, "config.model.arch")
  dtype = DTYPES[_choice(m.dtype, DTYPES, "config.model.dtype")]
  backend.check_attention_impl(m.attention_impl)
  if not isinstance(m.bn_group_size, int) or m.bn_group_size < 0:
    raise ValueError("config.model.bn_group_size must be an int >= 0 (0: statistics "
                     f"over the whole batch), got {m.bn_group_size!r}")
  for key in ("bn_two_pass_variance", "bn_running_var_unbiased"):
    if not isinstance(m[key], bool):
      raise ValueError(f"config.model.{key} must be True or False, got {m[key]!r}")
  sizes = stage_sizes(m)
  inflated = ()
  if arch == "resnet3d":
    inflated = tuple(sorted(hooks.parse_placement(
        m.resnet3d.inflate, sizes, key="config.model.resnet3d.inflate")))
  return resnet.VideoResNet(
      stage_sizes=sizes,
      num_classes=num_classes,
      num_frames=config.data.num_frames,
      bottleneck=DEPTHS[m.depth][1],
      width=m.width,
      small_stem=m.small_stem,
      inflated_blocks=inflated,
      stem_temporal_kernel=m.resnet3d.stem_temporal_kernel if arch == "resnet3d" else 1,
      stem_temporal_stride=m.resnet3d.stem_temporal_stride if arch == "resnet3d" else 1,
      pool1_temporal_stride=m.resnet3d.pool1_temporal_stride if arch == "resnet3d" else 1,
      pool2=m.resnet3d.pool2 if arch == "resnet3d" else False,
      frame_consensus=arch == "resnet2d",
      dropout_rate=m.dropout_rate,
      zero_init_residual=m.zero_init_residual,
      hooks=build_hooks(m, sizes, dtype),
      dtype=dtype,
      attention_impl=m.attention_impl,
      cpu_kernels=m.cpu_kernels,
      bn_group_size=m.bn_group_size,
      bn_two_pass_variance=m.bn_two_pass_variance,
      bn_running_var_unbiased=m.bn_running_var_unbiased)


def without_loops(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose model computes the same in one piece, with no loop.

  For counting FLOPs: XLA's cost analysis counts a while loop's body once,
  whatever its trip count, so the loop over frame chunks of SSA's spatial
  attention (`config.model.ssa.spatial_chunk`, a `lax.map`) would hide all but
  one chunk (SSA-R50 at 112px, 2 clips: 23.2 instead of 25.3 GFLOPs per clip).
  """
  config = copy.deepcopy(config)
  config.model.ssa.spatial_chunk = 0
  return config
