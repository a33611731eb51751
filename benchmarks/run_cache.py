"""Cached train + eval runs of configs: the bookkeeping of the scripts that fill a table.

`ablations.py` and `retrieval_table.py` each define rows, a mapping from a row's name
to a tuple that starts with a config of `configs/` (its file name without `.py`) and
its `--config.` overrides (`"key=value"` strings). A run of a row trains and evaluates
it once per seed with the README's commands (:func:`commands`, :func:`train_and_eval`)
and is cached as a JSON record that holds at least `row`, `overrides` and `recipe`,
the resolved config (:func:`recipe`). A cached run stands for its row as long as its
overrides are the row's and no key of its recipe has changed value
(:func:`is_current`): a change of recipe in `configs/` or `gta_jax/config_lib.py`,
or of the version of the dataset's builder (recorded as :data:`VERSION_KEY`),
retires the runs it invalidates. A key added later is not compared with a run
recorded before it, unless :data:`UNRECORDED_KEYS` says what such runs ran with (a
recipe that sets a new key away from the old behaviour must list it there), nor are
the settings of a temporal module the row does not use.
The generated docs are rebuilt from the current runs (:func:`load_runs`); a summary
goes between two marker lines of a hand-written page (:func:`replace_block`).
"""

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import flax
import ml_collections

from gta_jax import config_lib
from gta_jax.data import builders
from gta_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Keys each run sets for itself, left out of its recorded recipe.
RUN_KEYS = ("seed", "data.data_dir")
# Keys that change how a value is rounded, not what is computed: a run whose recipe
# differs only in them stays current.
NUMERICS_KEYS = ("model.bn_two_pass_variance",)
# The recipe's entry for the version of the dataset's builder (its `VERSION`).
VERSION_KEY = "data.builder_version"
# The embedded builders' versions when runs began to record theirs: a run recorded
# without :data:`VERSION_KEY` is read as built at these.
UNRECORDED_VERSIONS = {"synthetic_motion": "2.0.0", "synthetic_captions": "1.0.0",
                       "synthetic_long": "1.0.0"}
# Keys added after runs were recorded, with the value every run before them had in
# effect, where a recipe sets the key to something else: such runs are then retired.
# (Non-local never sub-sampled before `sub_sample`, whose default is the released
# True; SSA's logits were dot products before `temporal_cosine_scale`.)
UNRECORDED_KEYS = {"model.nl.sub_sample": False, "model.ssa.temporal_cosine_scale": 0.0}

# Row name -> (config file name, overrides, ...).
Rows = Mapping[str, Sequence[Any]]


def parse_override(value: str, current: Any) -> Any:
  """An override's text as the type of the value it replaces (as `--config.` does).

  Raises:
    ValueError: a boolean that is neither `True` nor `False`, or a number that does
      not parse.
  """
  if isinstance(current, bool):
    if value not in ("True", "False"):
      raise ValueError(f"expected True or False, got {value!r}")
    return value == "True"
  if isinstance(current, (int, float)):
    return type(current)(value)
  if isinstance(current, str):
    return value
  return ast.literal_eval(value)


def load_config(config_name: str,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/<config_name>.py` with the `key=value` overrides applied."""
  config = config_lib.from_file(os.path.join(REPO, "configs", f"{config_name}.py"))
  for override in overrides:
    key, _, value = override.partition("=")
    current = config
    for part in key.split("."):
      current = current[part]
    config.update_from_flattened_dict({key: parse_override(value, current)})
  return config


def recipe(config_name: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
  """The flattened config a row trains with, as JSON values, less :data:`RUN_KEYS`
  and the sections of temporal modules it does not use (`model.gta.*` of TSN), plus
  the version of its dataset's builder as :data:`VERSION_KEY`."""
  config = load_config(config_name, overrides)
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  flat[VERSION_KEY] = str(builders.builder_class(config.data.dataset).VERSION)
  used = registry.temporal_module_names(config.model)
  unused = tuple(f"model.{name}." for name in registry.TEMPORAL_MODULES
                 if name not in used)
  return json.loads(json.dumps({k: v for k, v in flat.items()
                                if k not in RUN_KEYS and not k.startswith(unused)}))


def changed_keys(run: Dict, current: Dict[str, Any]) -> List[str]:
  """The keys whose value in the run's recorded recipe differs from `current`'s.

  A key that only one of them has is not compared (a key added after the run),
  except that a run lacking a key of :data:`UNRECORDED_KEYS` has the value listed
  there; nor are :data:`NUMERICS_KEYS`. A run without :data:`VERSION_KEY` has the
  version of :data:`UNRECORDED_VERSIONS`, where that lists its dataset.
  """
  recorded = dict(run["recipe"])
  dataset = recorded.get("data.dataset")
  if VERSION_KEY not in recorded and dataset in UNRECORDED_VERSIONS:
    recorded[VERSION_KEY] = UNRECORDED_VERSIONS[dataset]
  for key, value in UNRECORDED_KEYS.items():
    recorded.setdefault(key, value)
  return sorted(k for k, v in recorded.items()
                if k in current and current[k] != v and k not in NUMERICS_KEYS)


def is_current(run: Dict, rows: Rows, recipes: Dict[str, Dict[str, Any]]) -> bool:
  """Whether a cached run still stands for its row of `rows`: the same overrides and
  no changed key of the recipe (`recipes` caches :func:`recipe` by row)."""
  row = run["row"]
  if row not in rows or run["overrides"] != list(rows[row][1]):
    return False
  if row not in recipes:
    recipes[row] = recipe(rows[row][0], rows[row][1])
  return not changed_keys(run, recipes[row])


def is_cached(path: str, rows: Rows, recipes: Dict[str, Dict[str, Any]]) -> bool:
  """Whether the file `path` holds a run that is still current (:func:`is_current`)."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return is_current(json.load(f), rows, recipes)


def save(record: Dict, path: str) -> None:
  """Caches a run's record as `path`."""
  with open(path, "w") as f:
    json.dump(record, f, indent=1)


def load_runs(runs_dir: str, rows: Rows) -> Dict[str, List[Dict]]:
  """The cached runs of `runs_dir` that are still current (:func:`is_current`), by
  row."""
  runs, recipes = {}, {}
  for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else ():
    with open(os.path.join(runs_dir, name)) as f:
      run = json.load(f)
    if is_current(run, rows, recipes):
      runs.setdefault(run["row"], []).append(run)
  return runs


def commands(config_name: str, overrides: Sequence[str], seed: int, workdir: str,
             data_dir: str) -> List[List[str]]:
  """The train and eval commands of one run, as run from the repository root."""
  flags_ = [f"--config=configs/{config_name}.py", f"--workdir={workdir}",
            f"--config.seed={seed}", f"--config.data.data_dir={data_dir}"]
  flags_ += [f"--config.{o}" for o in overrides]
  return [["python", script] + flags_ for script in ("train.py", "eval.py")]


def train_and_eval(cmds: Sequence[Sequence[str]], workdir: str, log_dir: str,
                   name: str) -> Tuple[List[float], str]:
  """Runs :func:`commands`' output from a fresh `workdir` (train.py would resume
  from an old one), each command's output to `<log_dir>/<name>_<script>.log`.

  Returns:
    The wall time of each command in seconds, and the path of the last
    `val_step<N>.json` that eval.py wrote.

  Raises:
    RuntimeError: a command failed.
  """
  shutil.rmtree(workdir, ignore_errors=True)
  seconds = []
  for cmd in cmds:
    start = time.perf_counter()
    log = os.path.join(log_dir, f"{name}_{cmd[1][:-3]}.log")
    os.makedirs(log_dir, exist_ok=True)
    with open(log, "w") as f:
      done = subprocess.run([sys.executable] + list(cmd[1:]), cwd=REPO, stdout=f,
                            stderr=subprocess.STDOUT, check=False)
    if done.returncode:
      raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}), see {log}")
    seconds.append(time.perf_counter() - start)
  eval_dir = os.path.join(workdir, "eval")
  summaries = sorted((f for f in os.listdir(eval_dir)
                      if f.startswith("val_step") and f.endswith(".json")),
                     key=lambda f: int(f[len("val_step"):-len(".json")]))
  return seconds, os.path.join(eval_dir, summaries[-1])


def run_record(row: str, rows: Rows, seed: int, cmds: Sequence[Sequence[str]],
               seconds: Sequence[float], results: Dict[str, Any]) -> Dict[str, Any]:
  """The cached record of a run of :func:`train_and_eval`: the row, its config and
  overrides, the seed and commands, the `results`, the train and eval wall times, the
  date and the :func:`recipe`."""
  config, overrides = rows[row][:2]
  return dict(
      row=row, config=f"configs/{config}.py", overrides=list(overrides), seed=seed,
      commands=[shlex.join(c) for c in cmds], **results,
      train_seconds=round(seconds[0], 1), eval_seconds=round(seconds[1], 1),
      date=time.strftime("%Y-%m-%d %H:%M"), recipe=recipe(config, overrides))


def config_cell(config_name: str, overrides: Sequence[str]) -> str:
  """A table cell naming a config and its overrides."""
  return " ".join([f"`{config_name}`"] + [f"`{o}`" for o in overrides])


def command_lines(rows: Sequence[str], runs: Dict[str, List[Dict]]) -> List[str]:
  """A bullet per run of `rows`, in that order and by seed (a record without a
  seed names none), with its date, exact commands and note."""
  lines = []
  for row in rows:
    for r in sorted(runs.get(row, ()), key=lambda r: r.get("seed", 0)):
      seed = f" seed {r['seed']}" if "seed" in r else ""
      note = f" ({r['note']})" if "note" in r else ""
      lines.append(f"- `{row}`{seed} ({r['date']}): "
                   + "; ".join(f"`{c}`" for c in r["commands"]) + note)
  return lines


def replace_block(text: str, block: str, begin: str, end: str) -> str:
  """`text` with the lines between the lines `begin` and `end` set to `block`.

  Raises:
    ValueError: `text` does not hold each marker exactly once.
  """
  if text.count(begin) != 1 or text.count(end) != 1:
    raise ValueError(f"the file must hold the lines {begin!r} and {end!r} once each")
  head, rest = text.split(begin + "\n")
  _, tail = rest.split(end)
  return head + begin + "\n" + block + end + tail
