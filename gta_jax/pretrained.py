"""ImageNet ResNet weights (torchvision, timm) for the video ResNets, 2D and inflated 3D.

`load_pretrained(variables, path, config)` fills a model's freshly initialised
variables from a ResNet-18/34/50/101 state dict with torchvision's names, which timm's
ResNets share (`conv1`, `bn1`, `layer1..4.<i>.{conv1,bn1,...,downsample.0/1}`, `fc`):

* convolutions, `(out, in, kh, kw)` -> flax `(kh, kw, in, out)`; where the model's
  kernel is 3D, `(kt, kh, kw, in, out)`, the 2D kernel is inflated (I3D): divided by
  kt and repeated over time (`inflation='mean'`), or put in the centre frame with
  zeros around it (`'center'`);
* BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var;
* the classifier `fc` when its class count is the model's; otherwise the model's
  fresh head stays.

What the file lacks (GTA, SSA, Non-local modules, a head of another class count) keeps
its initialisation and is listed. With `complete=True` (:mod:`gta_jax.convert`, whole
video models) every variable must come from the file, Non-local blocks included
(`layer<s>.<b>.nl.{theta,phi,g,out,bn}`), and nothing is inflated or left fresh.
A file of another architecture or a shape mismatch is an error naming the parameters. Files: `.pth`/`.pt`/`.bin` (PyTorch's zip format,
read without PyTorch and without running code from the file, see
:mod:`gta_jax.torch_pickle`), `.safetensors` and `.npz`.

`python -m gta_jax.pretrained inspect FILE [--config configs/X.py --config.a.b=v]`
lists what would load, and where.
"""

import collections
import dataclasses
import functools
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gta_jax import paths
from gta_jax import torch_pickle
from gta_jax.models import registry

INFLATIONS = ("mean", "center")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_BLOCK = re.compile(r"res([2-5])_block(\d+)")
_FILE_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")
# Sub-module of a residual block in flax -> its name in torchvision.
_BLOCK_MODULES = {
    ("conv1", "conv"): "conv1", ("conv2", "conv"): "conv2", ("conv3", "conv"): "conv3",
    ("bn1",): "bn1", ("bn2",): "bn2", ("bn3",): "bn3",
    ("downsample_conv", "conv"): "downsample.0", ("downsample_bn",): "downsample.1",
}
# (collection, leaf) in flax -> the tensor's suffix in torchvision.
_LEAVES = {
    ("params", "kernel"): "weight", ("params", "scale"): "weight",
    ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_HEAD = ("head", "fc")
# Sub-modules of a Non-local block (`<block>/post/...`, baselines.NonLocal).
NONLOCAL_MODULES = ("theta", "phi", "g", "out", "bn")
_FILE_NONLOCAL = re.compile(r"(layer[1-4]\.\d+)\.nl\.")

Path = Tuple[str, ...]


def torch_name(path: Path, nonlocal_blocks: bool = False) -> Optional[str]:
  """The torchvision/timm tensor name of a flax variable, None if it has none.

  Args:
    path: `(collection, *modules, leaf)`, e.g.
      `('params', 'res2_block0', 'conv1', 'conv', 'kernel')`.
    nonlocal_blocks: also name the variables of a Non-local block after a residual
      block, `layer<s>.<b>.nl.<theta|phi|g|out|bn>.<leaf>` (video checkpoints).

  Returns:
    e.g. `'layer1.0.conv1.weight'`; None for variables that ImageNet ResNets do not
    have (temporal modules unless named above, anything unknown).
  """
  collection, *modules, leaf = path
  suffix = _LEAVES.get((collection, leaf))
  modules = tuple(modules)
  if suffix is None or not modules:
    return None
  if modules == ("stem_conv", "conv"):
    name = "conv1"
  elif modules == ("stem_bn",):
    name = "bn1"
  elif modules == _HEAD:
    name = "fc"
  else:
    block = _BLOCK.fullmatch(modules[0])
    inner = _BLOCK_MODULES.get(modules[1:]) if block else None
    if (block and nonlocal_blocks and len(modules) == 3 and modules[1] == "post"
        and modules[2] in NONLOCAL_MODULES):
      inner = f"nl.{modules[2]}"
    if inner is None:
      return None
    name = f"layer{int(block[1]) - 1}.{block[2]}.{inner}"
  return f"{name}.{suffix}"


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state dict of name -> numpy array from `.pth`, `.safetensors` or `.npz`.

  A checkpoint that wraps the state dict under `state_dict` or `model` is unwrapped,
  and a `module.` prefix common to all names (DataParallel) is dropped.
  """
  path = os.fspath(path)
  if not paths.path(path).is_file():
    raise FileNotFoundError(f"pretrained weights {path!r}: no such file")
  if not path.endswith(TORCH_SUFFIXES + (".safetensors", ".npz")):
    raise ValueError(f"pretrained weights {path!r}: unknown file type; expected one "
                     f"of {TORCH_SUFFIXES + ('.safetensors', '.npz')}")
  with paths.local_file(path) as local:  # a bucket's file is copied to a temporary one
    if path.endswith(".safetensors"):
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
      state = safetensors_numpy.load_file(local)
    elif path.endswith(".npz"):
      with np.load(local, allow_pickle=False) as npz:
        state = {k: npz[k] for k in npz.files}
    else:
      state = torch_pickle.load(local)
  for key in ("state_dict", "model"):
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                     f"{type(state).__name__}")
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}; expected "
                       f"a plain state dict of name -> tensor")
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return dict(state)


def file_architecture(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """What ResNet a torchvision-named state dict holds.

  Returns:
    A dict with `stage_sizes` (blocks per stage), `bottleneck`, `width` (stem
    channels), `stem_kernel`, `num_classes` (None without `fc`), `depth` (None
    when the stage sizes are not a standard depth's), `stem_temporal_kernel`
    (None for a 2D stem) and `nonlocal_blocks` (how many `layer*.*.nl.` blocks).

  Raises:
    ValueError: the names are not a torchvision/timm ResNet's.
  """
  blocks = collections.defaultdict(set)
  for key in state_dict:
    match = _FILE_BLOCK.match(key)
    if match:
      blocks[int(match[1]) - 1].add(int(match[2]))
  stem = state_dict.get("conv1.weight")
  if stem is None or stem.ndim not in (4, 5) or sorted(blocks) != [0, 1, 2, 3]:
    raise ValueError(
        "not a torchvision/timm-style ResNet state dict (expected conv1.weight and "
        f"layer1..layer4.<i>.*; the first names are {list(state_dict)[:6]})")
  sizes = tuple(max(blocks[s]) + 1 for s in range(4))
  bottleneck = "layer1.0.conv3.weight" in state_dict
  depth = next((d for d, (s, b) in registry.DEPTHS.items()
                if s == sizes and b == bottleneck), None)
  fc = state_dict.get("fc.weight")
  nonlocal_blocks = {m[1] for k in state_dict if (m := _FILE_NONLOCAL.match(k))}
  return dict(stage_sizes=sizes, bottleneck=bottleneck, width=int(stem.shape[0]),
              stem_kernel=int(stem.shape[-1]), depth=depth,
              num_classes=int(fc.shape[0]) if fc is not None and fc.ndim == 2 else None,
              stem_temporal_kernel=int(stem.shape[2]) if stem.ndim == 5 else None,
              nonlocal_blocks=len(nonlocal_blocks))


def describe_file(state_dict: Mapping[str, np.ndarray]) -> str:
  """One line on the file's architecture, e.g. 'ResNet-50 (bottleneck blocks ...)'."""
  try:
    arch = file_architecture(state_dict)
  except ValueError as e:
    return str(e)
  name = f"ResNet-{arch['depth']}" if arch["depth"] else "a ResNet"
  kind = "bottleneck" if arch["bottleneck"] else "basic"
  classes = (f"{arch['num_classes']} classes" if arch["num_classes"]
             else "no classifier")
  stem = f"{arch['stem_kernel']}x{arch['stem_kernel']}"
  if arch["stem_temporal_kernel"]:
    name, stem = f"a 3D {name}", f"{arch['stem_temporal_kernel']}x{stem}"
  extra = (f", {arch['nonlocal_blocks']} Non-local blocks" if arch["nonlocal_blocks"]
           else "")
  return (f"{name} ({kind} blocks {','.join(map(str, arch['stage_sizes']))}, width "
          f"{arch['width']}, {stem} stem{extra}, {classes})")


def convert(value: np.ndarray, path: Path, target_shape: Tuple[int, ...],
            inflation: Optional[str] = "mean") -> Tuple[np.ndarray, str]:
  """Converts a torch tensor to the flax layout of variable `path`.

  A 2D flax kernel `(in, out)` (the classifier, a Non-local block's 1x1x1
  projections, which are `nn.Dense` here) takes a linear weight `(out, in)` or a
  convolution's `(out, in, 1, ..., 1)`; a 2D `(kh, kw, in, out)` one (also the kt=1
  convolutions of 3D networks) takes a 2D kernel or a 3D one with kt=1; a 3D one
  takes a 3D kernel, or with `inflation` a 2D one inflated (None: not inflated, the
  shapes then differ).

  Returns:
    `(array, how)`: the array (its shape may still differ from `target_shape`; the
    caller checks) and a few words on the conversion.
  """
  if path[-1] != "kernel" or value.ndim < 2:
    return value, "copied"
  if len(target_shape) == 2:
    if value.ndim > 2 and all(n == 1 for n in value.shape[2:]):
      return value.reshape(value.shape[:2]).T, "squeezed, transposed"
    return (value.T, "transposed") if value.ndim == 2 else (value, "copied")
  if value.ndim not in (4, 5):
    return value, "copied"
  if value.ndim == 5 and len(target_shape) == 4 and value.shape[2] == 1:
    # a 1xkxk 3D kernel where the model applies a 2D one (its kt=1 convolutions)
    return value[:, :, 0].transpose(2, 3, 1, 0), "squeezed kt=1, transposed"
  if value.ndim == 5:  # already 3D: (out, in, kt, kh, kw)
    return value.transpose(2, 3, 4, 1, 0), "transposed"
  kernel = value.transpose(2, 3, 1, 0)
  if len(target_shape) != 5 or inflation is None:
    return kernel, "transposed"
  kt = target_shape[0]
  if inflation == "mean":
    return np.repeat(kernel[None] / kt, kt, axis=0), f"inflated to kt={kt} (mean)"
  inflated = np.zeros((kt,) + kernel.shape, kernel.dtype)
  inflated[kt // 2] = kernel
  return inflated, f"inflated to kt={kt} (center)"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What loading a state dict into a model's variables does.

  Attributes:
    arrays: flax path -> the array it gets, in the variable's layout.
    loaded: `(flax path, file name, how)` per loaded variable.
    kept: `(flax path, why)` per variable that keeps its initialisation.
    ignored: `(file name, why)` per file entry not used.
  """
  arrays: Dict[Path, np.ndarray]
  loaded: List[Tuple[Path, str, str]]
  kept: List[Tuple[Path, str]]
  ignored: List[Tuple[str, str]]


def plan_load(variables: Any, state_dict: Mapping[str, np.ndarray], *,
              inflation: str = "mean", source: str = "state dict",
              complete: bool = False,
              file_name: Callable[[str], str] = lambda name: name) -> Plan:
  """Matches a state dict to a model's variables (arrays or shape structs).

  Args:
    variables: the model's `{'params': ..., 'batch_stats': ...}`; leaves need only
      `.shape` (`jax.eval_shape` output works).
    state_dict: torchvision/timm names -> arrays in PyTorch's layout.
    inflation: `'mean'` or `'center'`, for 3D kernels from 2D ones.
    source: the file's name, for messages.
    complete: the file holds the whole model (a video checkpoint): every variable,
      Non-local blocks and the classifier included, must come from it with its
      shape; no kernel is inflated.
    file_name: how messages name a state-dict entry (the file's own key, where
      `state_dict` was renamed from another layout).

  Returns:
    The :class:`Plan`.

  Raises:
    ValueError: naming every missing name, shape mismatch and unused file entry.
  """
  if inflation not in INFLATIONS:
    raise ValueError(f"config.model.pretrained_inflation must be one of "
                     f"{INFLATIONS}, got {inflation!r}")
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
  head = flat.get(("params",) + _HEAD + ("kernel",))
  file_fc = state_dict.get("fc.weight")
  head_kept = None
  if complete:
    pass
  elif head is not None and file_fc is None and "fc.bias" not in state_dict:
    head_kept = "the file has no classifier"
  elif (head is not None and file_fc is not None and file_fc.ndim == 2
        and file_fc.shape[1] == head.shape[0] and file_fc.shape[0] != head.shape[1]):
    head_kept = (f"the file's classifier has {file_fc.shape[0]} classes, the model "
                 f"{head.shape[1]}")

  plan = Plan({}, [], [], [])
  missing, mismatched, used = [], [], set()
  for path, leaf in flat.items():
    name = torch_name(path, nonlocal_blocks=complete)
    if name is None and complete:
      missing.append((f"[{'/'.join(path)}]", "a variable no checkpoint layout has"))
      continue
    if name is None:
      plan.kept.append((path, "not in ImageNet ResNets"))
      continue
    if head_kept and path[1:3] == _HEAD:
      plan.kept.append((path, head_kept))
      continue
    if name not in state_dict:
      missing.append((file_name(name), "/".join(path[1:-1])))
      continue
    used.add(name)
    value, how = convert(state_dict[name], path, tuple(leaf.shape),
                         None if complete else inflation)
    if value.shape != tuple(leaf.shape):
      layout = "" if value.shape == state_dict[name].shape else (
          f", {value.shape} as flax")
      mismatched.append(f"{file_name(name)} has shape {state_dict[name].shape}{layout}; "
                        f"{'/'.join(path)} needs {tuple(leaf.shape)}")
      continue
    plan.arrays[path] = value
    plan.loaded.append((path, name, how))

  unused = []
  for name in state_dict:
    if name in used:
      continue
    if name.endswith("num_batches_tracked"):
      plan.ignored.append((name, "BatchNorm step counter"))
    elif head_kept and name in ("fc.weight", "fc.bias"):
      plan.ignored.append((name, head_kept))
    else:
      unused.append((file_name(name), f"{state_dict[name].shape}"))
  if missing or mismatched or unused:
    problems = (_grouped(missing, "is missing (for {})") + mismatched
                + _grouped(unused, "{} is in the file but not in the model"))
    problems.sort(key=_model_order)
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(
        f"{source} does not fit the model ({len(missing)} arrays missing from the "
        f"file, {len(mismatched)} of another shape, {len(unused)} file entries "
        f"unused); file: {describe_file(state_dict)}:\n  {shown}{more}")
  return plan


def _model_order(text: str) -> Tuple[bool, List[Any]]:
  """Sorts torchvision names as the network runs: stem, layer1.0, ..., layer4.2, fc."""
  return text.startswith("fc."), [int(part) if part.isdigit() else part
                                  for part in re.split(r"(\d+)", text)]


def _grouped(entries: List[Tuple[str, str]], template: str) -> List[str]:
  """Lines of `name template.format(detail)`, the leaves of one module on one line."""
  modules = collections.defaultdict(list)
  for name, detail in entries:
    module, _, leaf = name.rpartition(".")
    modules[(module, detail)].append(leaf)
  lines = []
  for (module, detail), leaves in modules.items():
    name = f"{module}.{leaves[0]}" if len(leaves) == 1 else (
        f"{module}.{{{','.join(leaves)}}}")
    lines.append(f"{name} {template.format(detail)}")
  return lines


def apply_plan(variables: Any, plan: Plan) -> Any:
  """`variables` with the plan's arrays in place, cast to each variable's dtype."""
  frozen = isinstance(variables, flax.core.FrozenDict)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for path, value in plan.arrays.items():
    flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
  out = traverse_util.unflatten_dict(flat)
  return flax.core.freeze(out) if frozen else out


def _group_kept(kept: List[Tuple[Path, str]]) -> List[str]:
  groups = collections.defaultdict(int)
  for path, why in kept:
    groups[("/".join(path[1:3]), why)] += 1
  return [f"{module} ({n} arrays): {why}" for (module, why), n in groups.items()]


def summary(plan: Plan, source: str) -> List[str]:
  """A few lines: how much was loaded, what keeps its initialisation."""
  lines = [f"loaded {len(plan.loaded)} arrays from {source}; "
           f"{len(plan.kept)} keep their initialisation"]
  lines += ["  kept: " + line for line in _group_kept(plan.kept)]
  return lines


def load_pretrained(variables: Any, path: str, config: ml_collections.ConfigDict) -> Any:
  """Loads ImageNet ResNet weights into a model's initial variables.

  Args:
    variables: `model.init(...)` output (`params`, `batch_stats`, ...).
    path: a `.pth`, `.safetensors` or `.npz` file with torchvision/timm names.
    config: the experiment config; reads `config.model.pretrained_inflation`.

  Returns:
    The variables, same structure, with every ResNet weight from the file. They are
    on the default device: shard them after loading.

  Raises:
    ValueError: the file does not fit the model (names every parameter at fault) or
      is not a state dict; `torch_pickle.UnsafePickleError` for a pickle that would
      run code.
  """
  model_config = config.model if "model" in config else config
  plan = plan_load(variables, load_state_dict(path),
                   inflation=model_config.get("pretrained_inflation", "mean"),
                   source=path)
  for line in summary(plan, path):
    logging.info("%s", line)
  return apply_plan(variables, plan)


def config_for_file(state_dict: Mapping[str, np.ndarray]) -> ml_collections.ConfigDict:
  """A 2D model config with the file's architecture (for `inspect` without a config)."""
  from gta_jax import config_lib  # pylint: disable=g-import-not-at-top
  arch = file_architecture(state_dict)
  config = config_lib.base_config()
  config.model.depth = arch["depth"] or (50 if arch["bottleneck"] else 18)
  if arch["depth"] is None:
    config.model.stage_sizes = ",".join(map(str, arch["stage_sizes"]))
  config.model.width = arch["width"]
  config.model.num_classes = arch["num_classes"] or 1000
  config.model.small_stem = arch["stem_kernel"] == 3
  config.data.crop_size = 32 if config.model.small_stem else 224
  return config


def variable_shapes(config: ml_collections.ConfigDict) -> Any:
  """The model's variables as shape structs, without computing anything."""
  model = registry.build_model(config)
  size = config.data.crop_size
  video = jax.ShapeDtypeStruct((1, config.data.num_frames, size, size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False),
                        jax.random.key(0), video)


def inspect(path: str, config: Optional[ml_collections.ConfigDict] = None) -> List[str]:
  """The lines `python -m gta_jax.pretrained inspect` prints."""
  state_dict = load_state_dict(path)
  lines = [f"{path}: {len(state_dict)} tensors, {describe_file(state_dict)}"]
  if config is None:
    config = config_for_file(state_dict)
    lines.append(f"model: 2D ResNet with the file's architecture (pass --config "
                 f"to check a recipe), {config.model.num_classes} classes")
  else:
    m = config.model
    lines.append(f"model: {m.arch} depth {m.depth}, width {m.width}, "
                 f"{m.num_classes} classes, temporal modules "
                 f"{m.temporal_modules or 'none'}")
  model_config = config.model
  plan = plan_load(variable_shapes(config), state_dict,
                   inflation=model_config.get("pretrained_inflation", "mean"),
                   source=path)
  order = {name: i for i, name in enumerate(state_dict)}
  for target, name, how in sorted(plan.loaded, key=lambda entry: order[entry[1]]):
    lines.append(f"  {name} {tuple(state_dict[name].shape)} -> {'/'.join(target)} "
                 f"{tuple(plan.arrays[target].shape)} {how}")
  ignored = collections.Counter(why for _, why in plan.ignored)
  lines += [f"  not loaded: {n} x {why}" for why, n in ignored.items()]
  return lines + summary(plan, path)


def main(argv: List[str]) -> None:
  if len(argv) != 3 or argv[1] != "inspect":
    raise SystemExit("usage: python -m gta_jax.pretrained inspect FILE "
                     "[--config configs/X.py --config.a.b=value ...]")
  try:
    print("\n".join(inspect(argv[2], FLAGS.config)))
  except (OSError, ValueError, torch_pickle.UnsafePickleError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from gta_jax import cli  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS
  cli.define_config_flag("Optional: the recipe to check the file against.")
  app.run(main)
