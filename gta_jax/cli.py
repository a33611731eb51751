"""What the command-line tools share: flags, and the process they run in."""

import glob
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Callable, Union

from absl import app
from absl import flags
from ml_collections import config_flags

from gta_jax import recipes

# The flags the functions below define are the calling command's (its `--help`).
flags.disclaim_key_flags()

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "GTA_JAX_HUGE_PAGES"  # "0" turns `use_huge_pages` off.


def glibc_has_hugetlb() -> bool:
  """Whether this is Linux with glibc 2.35+, whose malloc has the `hugetlb` tunable."""
  libc, version = platform.libc_ver()
  return (sys.platform == "linux" and libc == "glibc"
          and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35))


def accelerator_expected() -> bool:
  """Whether JAX will run on a GPU or TPU here, judged without starting a backend.

  `JAX_PLATFORMS`, when set, decides (its first entry). Otherwise: a CUDA or ROCm
  plugin of JAX installed (a `jax_plugins` entry point) with its device files
  (`/dev/nvidiactl`, `/dev/kfd`), or `libtpu` with a TPU (`/dev/accel*`,
  `/dev/vfio/<n>`).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  plugins = " ".join(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
  gpu = (("cuda" in plugins and os.path.exists("/dev/nvidiactl"))
         or ("rocm" in plugins and os.path.exists("/dev/kfd")))
  tpu = (importlib.util.find_spec("libtpu") is not None
         and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))
  return gpu or tpu


def use_huge_pages() -> None:
  """Re-executes this process with glibc's malloc on transparent huge pages.

  XLA:CPU allocates a step's buffers afresh at every call, and glibc hands large
  blocks back to the kernel when they are freed, so with 4 KiB pages each ResNet-50
  train step faults in and zeroes about 155,000 pages: 0.4 s of system time in a
  1.4 s step (benchmarks/README.md). glibc's `glibc.malloc.hugetlb=1` tunable (2.35+)
  makes malloc ask for 2 MiB transparent huge pages, which removes nearly all of
  them (the step: 1.38 s -> 1.13 s). Tunables are read when the process starts, hence
  the `exec` of the same command line with `GLIBC_TUNABLES` extended.

  Does nothing off Linux/glibc 2.35+, on a GPU or TPU host
  (:func:`accelerator_expected`: the step's buffers live on the device), when
  `GLIBC_TUNABLES` already names the tunable, or when `GTA_JAX_HUGE_PAGES=0`. Call
  it first thing in `__main__`, before any thread or file is opened.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (not glibc_has_hugetlb() or not sys.executable or accelerator_expected()
      or "glibc.malloc.hugetlb" in tunables or os.environ.get(HUGE_PAGES_ENV) == "0"):
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)


def run(main: Callable[[list], None]) -> None:
  """`app.run(main)` in a process set up by :func:`use_huge_pages`.

  When `main`'s module is not `__main__` (a command started by a wrapper script such
  as the repository's `train.py`, or by a console script such as `gta-jax-train`),
  `--help` prints that module's docstring and flags, as it does for `python -m`.
  """
  use_huge_pages()
  module = sys.modules[main.__module__]
  entry = sys.modules["__main__"]
  if entry is not module:
    entry.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)


class _RecipeOrFileParser(flags.ArgumentParser):
  """ml_collections' config file parser, given a recipe's file for a recipe's name."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument: str):
    return self._parser.parse(recipes.resolve(argument))

  def flag_type(self) -> str:
    return self._parser.flag_type()


def define_config_flag(help_string: str, lock_config: bool = True) -> flags.FlagHolder:
  """`--config`: a recipe's name (`synthetic_gta`, see `python -m gta_jax.recipes`) or
  a config file's path, with `--config.a.b=value` overrides (ml_collections)."""
  holder = config_flags.DEFINE_config_file(
      "config", None, f"{help_string} A recipe's name (python -m gta_jax.recipes) or "
      "a config file's path.", lock_config=lock_config)
  flag = flags.FLAGS[holder.name]
  flag.parser = _RecipeOrFileParser(flag.parser)
  return holder


def define_distributed_flags() -> None:
  """`--coordinator_address --num_processes --process_id --single_process`."""
  flags.DEFINE_string("coordinator_address", "",
                      "host:port of process 0, for jax.distributed.")
  flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_bool("single_process", False,
                    "Run as one process even where a cluster (TPU pod slice, SLURM "
                    "step, Open MPI, ...) is detected.")


def initialize_distributed() -> None:
  """Starts `jax.distributed` from the flags of :func:`define_distributed_flags`."""
  from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                                  f.single_process)


# What the inference CLIs report in one line, exit status 1: a missing path or
# checkpoint, an unknown split, a checkpoint of another model (a ValueError).
USER_ERRORS = (FileNotFoundError, ValueError)


def report_error(error: Exception) -> int:
  """Prints `error: ...` on stderr; returns the exit status 1."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  return 1


def define_checkpoint_step_flag() -> None:
  flags.DEFINE_string("checkpoint_step", "latest",
                      "A step number, 'latest' or 'best' (by validation top-1).")


def define_run_flags() -> None:
  """`--config`, `--workdir` and `--checkpoint_step` of the tools that read a training
  run's checkpoint (predict, features, export); both the first are required."""
  define_config_flag("The config the checkpoint was trained with.")
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  define_checkpoint_step_flag()
  flags.mark_flags_as_required(["config", "workdir"])


def checkpoint_step() -> Union[int, str]:
  """The value of `--checkpoint_step`: 'latest', 'best' or a step number."""
  step = flags.FLAGS.checkpoint_step
  if step in ("latest", "best"):
    return step
  if not step.isdigit():
    raise app.UsageError(f"--checkpoint_step must be a step, 'latest' or 'best', "
                         f"got {step!r}")
  return int(step)
