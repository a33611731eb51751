"""Installing gta_jax in a notebook runtime without losing its accelerator.

Colab's GPU and TPU runtimes come with a JAX whose accelerator plugin
(`jax-cuda12-plugin`, `libtpu`) matches it. Installing gta_jax alone lets pip
upgrade `jax` and `jaxlib` to what gta_jax requires without the plugin, and JAX then
runs on the CPU. :func:`install_command` installs the package together with JAX's
extra for the runtime (`jax[cuda12]`, `jax[tpu]`), so that pip resolves jax, jaxlib
and the plugin as one set. Standard library only: the notebook calls it right after
installing gta_jax without its dependencies.
"""

import glob
import os
import re
import shutil
import sys
from typing import Collection, Mapping, Optional

# What tells a runtime's accelerator before JAX is installed.
GPU_DEVICE = re.compile(r"/dev/nvidia(\d+|ctl)")
TPU_DEVICE = re.compile(r"/dev/(accel\d+|vfio/\d+)")
TPU_VARIABLES = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")

JAX_EXTRAS = {"gpu": "jax[cuda12]", "tpu": "jax[tpu]", "cpu": None}


def detect_runtime(env: Mapping[str, str], device_files: Collection[str],
                   nvidia_smi: bool) -> str:
  """The runtime's accelerator: 'gpu', 'tpu' or 'cpu'.

  A GPU: `nvidia-smi` on the PATH, an NVIDIA device file (`/dev/nvidia0`,
  `/dev/nvidiactl`) or Colab's `COLAB_GPU=1`. A TPU: one of the TPU variables
  (`COLAB_TPU_ADDR`, `TPU_NAME`, `TPU_ACCELERATOR_TYPE`) or a TPU device file
  (`/dev/accel0`, `/dev/vfio/0`). The GPU is asked first: recent NVIDIA drivers
  create `/dev/accel*` files too.

  Args:
    env: the environment variables.
    device_files: the paths that exist among `/dev/nvidia*`, `/dev/accel*` and
      `/dev/vfio/*`.
    nvidia_smi: whether `nvidia-smi` is on the PATH.
  """
  if (nvidia_smi or env.get("COLAB_GPU") == "1"
      or any(GPU_DEVICE.fullmatch(f) for f in device_files)):
    return "gpu"
  if (any(env.get(v) for v in TPU_VARIABLES)
      or any(TPU_DEVICE.fullmatch(f) for f in device_files)):
    return "tpu"
  return "cpu"


def current_runtime() -> str:
  """:func:`detect_runtime` of this machine."""
  device_files = [f for pattern in ("/dev/nvidia*", "/dev/accel*", "/dev/vfio/*")
                  for f in glob.glob(pattern)]
  return detect_runtime(os.environ, device_files, shutil.which("nvidia-smi") is not None)


def install_command(runtime: str, package: str,
                    python: Optional[str] = None) -> list[str]:
  """The pip command that installs `package` with the JAX build of `runtime`.

  Args:
    runtime: 'gpu', 'tpu' or 'cpu' (:func:`detect_runtime`).
    package: a pip requirement, e.g. `gta_jax @ git+https://github.com/<owner>/gta_jax`.
    python: the interpreter whose pip installs (default: this one).

  Returns:
    `python -m pip install -q PACKAGE [jax[cuda12] | jax[tpu]]`: one pip call, so
    that jax, jaxlib and the plugin are resolved together with the package's own
    requirement on JAX. On the CPU, the package alone.
  """
  if runtime not in JAX_EXTRAS:
    raise ValueError(f"runtime must be one of {sorted(JAX_EXTRAS)}, got {runtime!r}")
  extra = JAX_EXTRAS[runtime]
  return [python or sys.executable, "-m", "pip", "install", "-q", package,
          *([extra] if extra else [])]


def backend_warning(runtime: str, backend: str) -> str:
  """A warning when a GPU or TPU runtime's JAX runs on the CPU, else ''.

  Args:
    runtime: :func:`detect_runtime`'s answer.
    backend: `jax.default_backend()`.
  """
  if runtime == "cpu" or backend != "cpu":
    return ""
  return (f"This is a {runtime.upper()} runtime but JAX runs on the CPU: its "
          f"{JAX_EXTRAS[runtime]} plugin is missing or does not match jax. Run the "
          "install cell again, then restart the session (Runtime > Restart session) and "
          "run all cells.")
