"""The shipped recipes: one file per recipe, `get_config()` -> ml_collections.ConfigDict.

Every command's `--config` takes a recipe's name (`--config=synthetic_gta`) or the
path of a config file (`--config=my_config.py`); `python -m gta_jax.recipes` lists
the recipes. In a clone of the repository, `configs/` is a link to this folder, so
`--config=configs/synthetic_gta.py` names the same file.
"""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The recipes' names, sorted."""
  return sorted(f[:-3] for f in os.listdir(DIRECTORY)
                if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
  """The file of the recipe `name`.

  Raises:
    ValueError: no recipe has that name (the message lists them).
  """
  if name not in names():
    raise ValueError(f"no recipe named {name!r}: pass a config file's path, or one of "
                     f"{', '.join(names())} (python -m gta_jax.recipes)")
  return os.path.join(DIRECTORY, f"{name}.py")


def resolve(argument: str) -> str:
  """A `--config` value with a recipe's name replaced by the recipe's file.

  A value whose part before the first `:` (ml_collections passes what follows to
  `get_config`) has no `/` and no `.py` is a recipe's name; any other is a path
  and is returned as given.

  Args:
    argument: e.g. `synthetic_gta`, `configs/synthetic_gta.py` or `my.py:arg`.

  Returns:
    The path of a config file, followed by the same `:` suffix if there was one.

  Raises:
    ValueError: a name that is no recipe's.
  """
  head, colon, tail = argument.partition(":")
  if "/" in head or os.sep in head or head.endswith(".py"):
    return argument
  return path(head) + colon + tail
