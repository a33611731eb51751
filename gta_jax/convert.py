"""Converts a published video checkpoint into a run of this project.

  python -m gta_jax.convert --source=mmaction2 --checkpoint=X.pth \
      --config=k400_tsm_r50_mmaction2 --workdir=OUT

reads the `.pth` through :mod:`gta_jax.torch_pickle` (no PyTorch, no code from the
file), renames its keys from the source's layout to torchvision's (the names
:mod:`gta_jax.pretrained` maps onto the model), maps every array onto the recipe's
variables and writes `OUT/checkpoints/0` as a training run would: `eval.py`,
`python -m gta_jax.predict`, `python -m gta_jax.features` and `config.init_from=OUT`
then use it as they use any run. `OUT/config.py` rebuilds the config it was converted
for (the recipe and any `--config.*` overrides; pass it as `--config`), and
`OUT/convert.json` says what was read and how.

Sources (`--source`):

* `mmaction2`: open-mmlab/mmaction2's checkpoints, `{'meta': ..., 'state_dict': ...}`
  with `backbone.conv1.conv.weight`, `backbone.layer1.0.conv1.{conv,bn}.*` (TSM:
  `conv1.conv.net.weight`; blocks with a Non-local block: `layer2.0.block.*` and
  `layer2.0.non_local_block.{theta,phi,g,conv_out}.*`), `cls_head.fc_cls.*`.
* `tsm`: the TSM authors' files (mit-han-lab/temporal-shift-module),
  `module.base_model.layer1.0.conv1.net.weight`, `module.new_fc.*`; with Non-local
  blocks `layer2.0.block.*` and `layer2.0.nl.{theta,phi,g,W}.*`.

Two tensors have no variable here because they do not change the function: the bias
of a Non-local block's `phi` (each query's logits shift by one constant, which the
softmax over the keys cancels) is dropped, and the bias of the TSM authors' output
conv `W.0` (followed by a BatchNorm) is folded into that BatchNorm's running mean
(`BN(Wy + b)` with mean `m` is `BN(Wy)` with mean `m - b`). Anything else that does
not fit (a missing or unexpected array, another shape, another architecture) is an
error naming the first arrays at fault, and nothing is written.
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from gta_jax import paths
from gta_jax import pretrained
from gta_jax import recipes

SOURCES = ("mmaction2", "tsm")
# Each source's key prefix (after `module.`, which pretrained.load_state_dict drops).
_PREFIXES = {"mmaction2": "backbone.", "tsm": "base_model."}
# (pattern, replacement) applied in order to a key without its prefix: source layout
# -> torchvision's names (`conv1`, `bn1`, `layerN.M.{conv1,bn1,...,downsample.0/1}`,
# `fc`) and `layerN.M.nl.{theta,phi,g,out,bn}` for Non-local blocks.
_RENAMES = {
    "mmaction2": (
        (r"^cls_head\.fc_cls\.", "fc."),
        (r"^conv1\.conv\.", "conv1."),
        (r"^conv1\.bn\.", "bn1."),
        (r"\.block\.", "."),
        (r"\.non_local_block\.(g|phi)\.0\.conv\.", r".nl.\1."),
        (r"\.non_local_block\.(g|phi|theta)\.conv\.", r".nl.\1."),
        (r"\.non_local_block\.conv_out\.conv\.", ".nl.out."),
        (r"\.non_local_block\.conv_out\.bn\.", ".nl.bn."),
        (r"\.conv(\d)\.conv\.(net\.)?", r".conv\1."),
        (r"\.conv(\d)\.bn\.", r".bn\1."),
        (r"\.downsample\.conv\.", ".downsample.0."),
        (r"\.downsample\.bn\.", ".downsample.1."),
    ),
    "tsm": (
        (r"^new_fc\.", "fc."),
        (r"\.block\.", "."),
        (r"\.nl\.(g|phi)\.0\.", r".nl.\1."),
        (r"\.nl\.W\.0\.", ".nl.out."),
        (r"\.nl\.W\.1\.", ".nl.bn."),
        (r"\.conv1\.net\.", ".conv1."),
    ),
}
_SUBSAMPLED = {"mmaction2": re.compile(r"\.non_local_block\.g\.0\."),
               "tsm": re.compile(r"\.nl\.g\.0\.")}


@dataclasses.dataclass
class Renamed:
  """A checkpoint in torchvision's names.

  Attributes:
    state_dict: torchvision-style name -> array (PyTorch's layout).
    file_keys: torchvision-style name -> the file's own key.
    notes: what was dropped or folded, one line each.
    subsampled: whether its Non-local blocks max-pool their keys (None: no blocks).
  """
  state_dict: Dict[str, np.ndarray]
  file_keys: Dict[str, str]
  notes: List[str]
  subsampled: Optional[bool] = None

  def file_name(self, name: str) -> str:
    """The file's key of a torchvision-style name; an array the file lacks keeps
    the torchvision-style name (messages add the model's variable)."""
    return self.file_keys.get(name, name)


def rename(state_dict: Mapping[str, np.ndarray], source: str, *,
           where: str = "checkpoint") -> Renamed:
  """Renames a source's state dict to torchvision's names (see the module docstring).

  Raises:
    ValueError: an unknown source, or a file whose keys are not that source's.
  """
  if source not in SOURCES:
    raise ValueError(f"--source must be one of {SOURCES}, got {source!r}")
  prefix = _PREFIXES[source]
  backbone = [k for k in state_dict if k.startswith(prefix)]
  if not backbone:
    raise ValueError(
        f"{where} is not in the {source} layout: no key starts with {prefix!r} (the "
        f"first keys are {list(state_dict)[:5]}); see python -m gta_jax.convert --help")
  out = Renamed({}, {}, [])
  for key, value in state_dict.items():
    name = key[len(prefix):] if key.startswith(prefix) else key
    for pattern, replacement in _RENAMES[source]:
      name = re.sub(pattern, replacement, name)
    if _SUBSAMPLED[source].search(key):
      out.subsampled = True
    elif ".nl." in name and out.subsampled is None:
      out.subsampled = False
    if re.search(r"\.nl\.phi\.bias$", name):
      out.notes.append(f"dropped {key}: the softmax over the keys cancels phi's bias")
      continue
    if name in out.state_dict:
      raise ValueError(f"{where}: {key} and {out.file_keys[name]} both map to {name}")
    out.state_dict[name] = value
    out.file_keys[name] = key
  if source == "tsm":
    _fold_output_bias(out)
  return out


def _fold_output_bias(renamed: Renamed) -> None:
  """Folds the bias of each Non-local block's output conv into the BN's mean."""
  for name in [n for n in renamed.state_dict if n.endswith(".nl.out.bias")]:
    mean_name = name.replace(".nl.out.bias", ".nl.bn.running_mean")
    bias = renamed.state_dict.pop(name)
    key = renamed.file_keys.pop(name)
    if mean_name not in renamed.state_dict:
      raise ValueError(f"{key}: the bias of a Non-local output conv with no BatchNorm "
                       f"after it ({renamed.file_name(mean_name)} is missing)")
    renamed.state_dict[mean_name] = renamed.state_dict[mean_name] - bias
    renamed.notes.append(f"folded {key} into {renamed.file_keys[mean_name]} "
                         "(BN(Wy + b) = BN'(Wy), running mean - b)")


def check_architecture(renamed: Renamed, config: ml_collections.ConfigDict,
                       where: str) -> None:
  """Refuses a checkpoint of another architecture than the config's, in words.

  Raises:
    ValueError: naming what differs (2D/3D, Non-local blocks and their
      sub-sampling, the classifier), before any array is compared.
  """
  arch = pretrained.file_architecture(renamed.state_dict)
  m = config.model
  problems = []
  file_3d = arch["stem_temporal_kernel"] is not None
  if file_3d != (m.arch == "resnet3d"):
    problems.append(f"the file is a {'3D' if file_3d else '2D'} network, the config's "
                    f"model.arch is {m.arch!r}")
  wants_nl = "nl" in [n.strip() for n in m.temporal_modules.split(",")]
  if bool(arch["nonlocal_blocks"]) != wants_nl:
    problems.append(f"the file has {arch['nonlocal_blocks']} Non-local blocks, the "
                    f"config's model.temporal_modules is {m.temporal_modules!r}")
  elif wants_nl and renamed.subsampled != m.nl.sub_sample:
    problems.append(f"the file's Non-local blocks {'' if renamed.subsampled else 'do not '}"
                    "max-pool their keys and values, config.model.nl.sub_sample is "
                    f"{m.nl.sub_sample}")
  if arch["num_classes"] not in (None, m.num_classes):
    problems.append(f"the file's classifier has {arch['num_classes']} classes, "
                    f"config.model.num_classes is {m.num_classes}")
  if problems:
    raise ValueError(f"{where} holds another architecture than the config "
                     f"({pretrained.describe_file(renamed.state_dict)}): "
                     + "; ".join(problems))


def convert_variables(path: str, source: str, config: ml_collections.ConfigDict
                      ) -> Tuple[Dict, pretrained.Plan, Renamed]:
  """The model variables of `config` from the checkpoint file `path`.

  Returns:
    `(variables, plan, renamed)`: `{'params', 'batch_stats'}` of numpy arrays, what
    went where, and the renamed checkpoint (its notes).

  Raises:
    ValueError: the file is not the source's layout or does not fit the model
      (naming the arrays); `torch_pickle.UnsafePickleError` for a pickle that would
      run code.
  """
  renamed = rename(pretrained.load_state_dict(path), source, where=path)
  check_architecture(renamed, config, path)
  shapes = pretrained.variable_shapes(config)
  plan = pretrained.plan_load(shapes, renamed.state_dict, source=path, complete=True,
                              file_name=renamed.file_name)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  variables = pretrained.apply_plan(zeros, plan)
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  return jax.tree.map(np.asarray, variables), plan, renamed


def config_file_text(config: ml_collections.ConfigDict, config_argument: str) -> str:
  """A config file that rebuilds `config`: its recipe plus what differs from it."""
  from gta_jax import config_lib  # pylint: disable=g-import-not-at-top
  recipe_path = os.path.abspath(recipes.resolve(config_argument.partition(":")[0]))
  base = _flat(config_lib.from_file(recipe_path))
  overrides = {k: v for k, v in _flat(config).items() if base.get(k) != v}
  name = os.path.splitext(os.path.basename(recipe_path))[0]
  shipped = name in recipes.names() and recipe_path == os.path.abspath(recipes.path(name))
  load = f"recipes.path({name!r})" if shipped else repr(recipe_path)
  return (f'"""The config gta_jax.convert converted this checkpoint for: '
          f'{config_argument}."""\n\n'
          "from gta_jax import config_lib\nfrom gta_jax import recipes\n\n\n"
          "def get_config():\n"
          f"  config = config_lib.from_file({load})\n"
          f"  config.update_from_flattened_dict({overrides!r})\n"
          "  return config\n")


def _flat(config: ml_collections.ConfigDict) -> Dict[str, object]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
    else:
      out[key] = value
  return out


def write_run(workdir: str, variables: Dict, config: ml_collections.ConfigDict,
              config_text: str, provenance: Dict[str, object]) -> None:
  """Writes `workdir/checkpoints/0` (a train state at step 0 with `variables`),
  `workdir/config.py` and `workdir/convert.json`, into a workdir that
  :func:`check_new_workdir` passed."""
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  _, tx, _, _ = state_lib.build(config)
  state = state_lib.create_train_state(variables, tx)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  ckpt.save(0, state, None, config)
  ckpt.wait()
  ckpt.close()
  root = paths.path(workdir)
  (root / "config.py").write_text(config_text)
  (root / "convert.json").write_text(json.dumps(provenance, indent=1) + "\n")


def check_new_workdir(workdir: str) -> None:
  """Raises FileExistsError if `workdir` already holds checkpoints."""
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  if checkpoint.checkpoint_dir(workdir).exists():
    raise FileExistsError(f"--workdir={workdir} already holds checkpoints; give a new "
                          "folder")


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with paths.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def convert(source: str, checkpoint_path: str, config: ml_collections.ConfigDict,
            config_argument: str, workdir: str) -> List[str]:
  """Converts `checkpoint_path` into a run in `workdir`; returns the lines to print.

  Raises:
    FileExistsError: the workdir already holds checkpoints (before any conversion).
  """
  check_new_workdir(workdir)
  variables, plan, renamed = convert_variables(checkpoint_path, source, config)
  provenance = dict(source=source, checkpoint=os.fspath(paths.path(checkpoint_path)),
                    sha256=sha256(checkpoint_path), config=config_argument,
                    arrays=len(plan.loaded), notes=renamed.notes,
                    not_loaded=[f"{renamed.file_name(n)}: {why}" for n, why in plan.ignored])
  write_run(workdir, variables, config, config_file_text(config, config_argument),
            provenance)
  return ([f"{checkpoint_path}: {pretrained.describe_file(renamed.state_dict)}",
           f"loaded {len(plan.loaded)} arrays into every variable of {config_argument}"]
          + [f"  {note}" for note in renamed.notes]
          + [f"  not loaded: {line}" for line in provenance["not_loaded"]]
          + [f"wrote {workdir}/checkpoints/0, {workdir}/config.py, "
             f"{workdir}/convert.json; evaluate with: python -m gta_jax.eval "
             f"--config={workdir}/config.py --workdir={workdir}"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  from gta_jax import torch_pickle  # pylint: disable=g-import-not-at-top
  try:
    lines = convert(FLAGS.source, FLAGS.checkpoint, FLAGS.config,
                    config_flags.get_config_filename(FLAGS["config"]), FLAGS.workdir)
  except (OSError, ValueError, torch_pickle.UnsafePickleError) as e:
    raise SystemExit(f"error: {e}") from None
  for line in lines:
    logging.info("%s", line)
    print(line)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from gta_jax import cli  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS
  flags.DEFINE_enum("source", None, SOURCES, "The checkpoint's layout.")
  flags.DEFINE_string("checkpoint", None, "The .pth file.")
  flags.DEFINE_string("workdir", None, "The run folder to write (must hold no checkpoints).")
  cli.define_config_flag("The recipe (name or file) whose model the checkpoint is.")
  flags.mark_flags_as_required(["source", "checkpoint", "workdir", "config"])
  app.run(main)
