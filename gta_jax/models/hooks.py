"""How temporal modules attach to a backbone: specs and placement strings.

Each temporal module (TSM, Non-local, GTA, SSA) is described by a
:class:`TemporalModuleSpec`: the hook point it uses in a residual block, its default
config (under `config.model.<name>`) and a function that turns that config into a
module factory. `gta_jax.models.registry` lists the specs by name.

A placement names residual blocks by stage and block index, in the stage names of
the ResNet papers (`res2`..`res5` = torchvision's `layer1`..`layer4`):

* ``"all"``: every block of every stage.
* ``"res3:0,2;res4:0,2,4"``: blocks 0 and 2 of res3, blocks 0, 2 and 4 of res4.
* ``"res4:all"``: every block of res4.
* ``""``: nowhere.
"""

import dataclasses
from typing import Any, Callable, FrozenSet, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gta_jax.models import resnet

STAGE_NAMES = ("res2", "res3", "res4", "res5")

BlockId = Tuple[int, int]  # (stage index 0..3, block index)


def parse_placement(spec: str, stage_sizes: Sequence[int], *,
                    key: str = "placement") -> FrozenSet[BlockId]:
  """Parses a placement string into a set of `(stage, block)` indices.

  Args:
    spec: the placement string (see the module docstring).
    stage_sizes: blocks per stage of the backbone, e.g. `(3, 4, 6, 3)`.
    key: the config key the string came from, for error messages.

  Returns:
    The set of `(stage_index, block_index)` pairs.

  Raises:
    ValueError: naming the key, the stage or block at fault and what is allowed.
  """
  if not isinstance(spec, str):
    raise ValueError(f"{key} must be a string such as 'res3:0,2;res4:0,2,4', "
                     f"got {spec!r}")
  spec = spec.replace(" ", "")
  if spec == "all":
    return frozenset((s, b) for s, n in enumerate(stage_sizes) for b in range(n))
  blocks = set()
  for part in filter(None, spec.split(";")):
    stage_name, sep, indices = part.partition(":")
    if not sep or stage_name not in STAGE_NAMES:
      raise ValueError(
          f"{key}: cannot parse {part!r} in {spec!r}; expected '<stage>:<blocks>' "
          f"with stage one of {STAGE_NAMES}, e.g. 'res3:0,2;res4:0,2,4' or 'all'")
    stage = STAGE_NAMES.index(stage_name)
    size = stage_sizes[stage]
    if indices == "all":
      blocks.update((stage, b) for b in range(size))
      continue
    for index in indices.split(","):
      try:
        block = int(index)
      except ValueError:
        raise ValueError(f"{key}: block index {index!r} of {stage_name} is not an "
                         f"integer (in {spec!r})") from None
      if not 0 <= block < size:
        raise ValueError(f"{key}: {stage_name} has blocks 0..{size - 1} in this "
                         f"backbone, got block {block} (in {spec!r})")
      blocks.add((stage, block))
  return frozenset(blocks)


@dataclasses.dataclass(frozen=True)
class TemporalModuleSpec:
  """A temporal module the registry can place into a backbone.

  Attributes:
    position: the hook point in a residual block: `pre` (before the first conv,
      on the residual branch), `inner` (after the first conv+BN+ReLU, replacing the
      feature) or `post` (after the block, residual).
    default_config: returns the module's config, with at least a `placement` string.
    build: `(module_config, dtype) -> factory`; `factory(name=...)` makes a module
      called as `module(x, train=...)` on `(B, T, H, W, C)`.
  """
  position: str
  default_config: Callable[[], ml_collections.ConfigDict]
  build: Callable[[ml_collections.ConfigDict, Any], Callable[..., nn.Module]]


def residual_tail(x: jax.Array, y: jax.Array, *, train: bool, dtype: Any,
                  gate_init: float = 0.0, project: bool = True) -> jax.Array:
  """`x + BN(W y)`: the output of a residual temporal module (GTA, SSA, Non-local).

  Called inside a module's compact method, it creates that module's `out` (a
  bias-free 1x1 conv to `x`'s channels, which the BN's shift makes redundant to
  bias) and `bn`, whose scale starts at `gate_init`: at 0 the module is the
  identity at init, so it can go into a pretrained network.

  Args:
    x: the module's input `(..., C)`.
    y: the module's branch output `(..., C')`, `C' = C` unless `project`.
    train: BatchNorm with batch statistics (else the running ones).
    dtype: compute dtype; parameters are float32.
    gate_init: the BN scale's initial value.
    project: apply `out`; False needs `y` with `C` channels already.

  Returns:
    `x + BN(W y)`, the shape of `x`.
  """
  if project:
    y = nn.Dense(x.shape[-1], use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 name="out")(y)
  bn = resnet.batch_norm(train, dtype,
                         scale_init=nn.initializers.constant(gate_init))
  return x + bn(name="bn")(y)
