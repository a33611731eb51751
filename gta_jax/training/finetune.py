"""Starting a run from another run of this project: `config.init_from`.

`config.init_from` names a training run's directory (its latest checkpoint), its
`checkpoints/` folder, or one step's folder (`WORKDIR/checkpoints/N`), local or
remote (`gta_jax.paths`). Every parameter and BatchNorm statistic of the new model
whose path and shape match the checkpoint's is taken from it; the rest keeps its
fresh initialisation:

* the classifier (`head/fc`) when its shape differs (another `num_classes`);
* whatever the regex `config.init_reinit` finds (`re.search`) in a variable's path
  without its collection, e.g. `head/fc/kernel`, `res5_block0/bn3/scale`,
  `res3_block0/post/...` (a module placed after res3's block 0); such paths of the
  checkpoint that the new model lacks are ignored too.

Anything else that differs (a missing array on either side, another shape) means
another architecture: an `IncompatibleCheckpointError` names the first few paths
with both shapes. Only the variables are read: the step, the optimizer state and the
data position start afresh. `loop.train_and_evaluate` only initialises when the
workdir has no checkpoint, so a run resumes from its own checkpoints as usual.
"""

import dataclasses
import re
from typing import Any, Dict, List, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from gta_jax import paths
from gta_jax.training import errors

COLLECTIONS = ("params", "batch_stats")
CLASSIFIER = re.compile(r"^head/fc/")
SHOWN = 5  # paths named in an error


@dataclasses.dataclass
class Report:
  """What :func:`merge` did, by variable path (`params/...`, `batch_stats/...`)."""
  loaded: List[str]
  reinitialised: Dict[str, str]  # path -> why
  ignored: List[str]  # in the checkpoint only, matched by `config.init_reinit`


def find_step_dir(init_from: paths.PathLike) -> epath.Path:
  """The folder of the checkpoint `init_from` names (see the module docstring).

  Raises:
    FileNotFoundError: naming the path, when it or its checkpoints do not exist.
  """
  where = paths.path(init_from)
  if not where.exists():
    raise FileNotFoundError(f"config.init_from={init_from!r}: no such folder")
  if (where / "state").exists():
    return where
  if (where / "checkpoints").exists():
    where = where / "checkpoints"
  steps = [int(p.name) for p in where.iterdir() if p.name.isdigit() and (p / "state").exists()]
  if not steps:
    raise FileNotFoundError(
        f"config.init_from={init_from!r}: no checkpoint in {where} (give a training "
        "run's directory, its checkpoints/ folder or one step's folder)")
  return where / str(max(steps))


def is_retrieval_run(init_from: paths.PathLike) -> bool:
  """Whether the checkpoint `init_from` names is a text-video retrieval model's."""
  tree = ocp.PyTreeCheckpointer().metadata(find_step_dir(init_from) / "state")
  return "video" in tree.item_metadata.tree.get("params", {})


def read_variables(step_dir: epath.Path) -> Dict[str, np.ndarray]:
  """The `params` and `batch_stats` of a checkpoint, flat (`params/res2_block0/...`)."""
  item = step_dir / "state"
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(item).item_metadata.tree
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k])
            for k in COLLECTIONS if k in tree}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = reader.restore(item, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return traverse_util.flatten_dict(restored, sep="/")


def _within(path: str) -> str:
  """A variable's path without its collection: `params/head/fc/kernel` -> `head/fc/kernel`."""
  return path.split("/", 1)[1]


def merge(fresh: Dict[str, Any], saved: Dict[str, Any], reinit: str = ""
          ) -> Tuple[Dict[str, Any], Report, List[str]]:
  """Takes the saved arrays that fit into the fresh ones (flat dicts, both).

  Args:
    fresh: the new model's initial variables by path (arrays, or shapes and dtypes).
    saved: the checkpoint's variables by path.
    reinit: a regex (`re.search` on the path without its collection) of variables
      to keep fresh; '' for none.

  Returns:
    `(variables, report, problems)`: the merged flat variables, what was done, and
    one line per array that fits neither way (another architecture); parameters
    before BatchNorm statistics, by path.
  """
  pattern = re.compile(reinit) if reinit else None
  wanted = lambda p: pattern is not None and pattern.search(_within(p)) is not None
  merged, report, problems = dict(fresh), Report([], {}, []), []
  params_first = lambda p: (not p.startswith("params/"), p)
  for path, value in sorted(fresh.items(), key=lambda item: params_first(item[0])):
    shape = tuple(value.shape)
    old = tuple(saved[path].shape) if path in saved else None
    if wanted(path):
      report.reinitialised[path] = "config.init_reinit"
    elif old == shape:
      merged[path] = np.asarray(saved[path], dtype=value.dtype)
      report.loaded.append(path)
    elif old is not None and CLASSIFIER.search(_within(path)):
      report.reinitialised[path] = f"classifier {old} -> {shape}"
    else:
      problems.append(f"{path}: {old or 'missing'} in the checkpoint, {shape} in the model")
  for path in sorted(set(saved) - set(fresh), key=params_first):
    if wanted(path):
      report.ignored.append(path)
    else:
      problems.append(f"{path}: {tuple(saved[path].shape)} in the checkpoint, "
                      "missing in the model")
  return merged, report, problems


def load_init_from(variables: Any, config) -> Any:
  """`variables` (host arrays) with the matching ones of `config.init_from`.

  Raises:
    FileNotFoundError: the path or its checkpoints do not exist.
    errors.IncompatibleCheckpointError: a checkpoint of another architecture
      (`checkpoint.IncompatibleCheckpointError` is the same class).
    ValueError: `config.init_reinit` is not a regex.
  """
  try:
    re.compile(config.init_reinit)
  except re.error as e:
    raise ValueError(f"config.init_reinit={config.init_reinit!r} is not a regex: {e}") from e
  step_dir = find_step_dir(config.init_from)
  fresh = traverse_util.flatten_dict(variables, sep="/")
  merged, report, problems = merge(fresh, read_variables(step_dir), config.init_reinit)
  if problems:
    raise errors.IncompatibleCheckpointError(
        f"config.init_from: {step_dir} holds another architecture than the config "
        f"describes ({len(problems)} arrays differ: {'; '.join(problems[:SHOWN])}"
        f"{'; ...' if len(problems) > SHOWN else ''}). Start from a run of the same "
        "model, or name the differing variables in config.init_reinit (a regex).")
  logging.info("init_from %s: loaded %d arrays; re-initialised %d: %s%s", step_dir,
               len(report.loaded), len(report.reinitialised),
               ", ".join(f"{p} ({why})" for p, why in report.reinitialised.items()) or "none",
               f"; ignored {len(report.ignored)} of the checkpoint's: "
               f"{', '.join(report.ignored)}" if report.ignored else "")
  return traverse_util.unflatten_dict(merged, sep="/")
