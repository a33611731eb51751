"""Lists the shipped recipes: `python -m gta_jax.recipes`.

One line per recipe, read from its config: the name `--config` takes, the task,
the dataset, the network (arch, depth, temporal modules), frames per clip and steps.
"""

from gta_jax import config_lib
from gta_jax import recipes


def describe(name: str) -> str:
  """One line about the recipe `name`."""
  c = config_lib.from_file(recipes.path(name))
  network = f"{c.model.arch}-{c.model.depth}"
  if c.model.stage_sizes:
    network += f"[{c.model.stage_sizes}]"
  modules = c.model.temporal_modules or "tsn"
  return (f"{name:28s} {c.task:14s} {c.data.dataset:24s} {network:22s} {modules:8s} "
          f"{c.data.num_frames:6d} {c.total_steps:7d}")


def main() -> None:
  print(f"{'recipe (--config=NAME)':28s} {'task':14s} {'dataset':24s} {'network':22s} "
        f"{'modules':8s} {'frames':>6s} {'steps':>7s}")
  for name in recipes.names():
    print(describe(name))
  print(f"\nfiles: {recipes.DIRECTORY}")


if __name__ == "__main__":
  main()
