"""Process-level XLA settings, applied before JAX is imported.

XLA reads `XLA_FLAGS` once, when the backend starts, so entry points
(`train.py`, `eval.py`, `benchmarks/bench.py`) call :func:`configure_xla`
before their first `import jax`. This module must not import JAX itself.

The defaults are the XLA:CPU settings `benchmarks/README.md` measured as the
fastest for the project's networks on a CPU; they are inert on GPU and TPU. A flag
the user already put in `XLA_FLAGS` is never overridden, and `GTA_JAX_XLA_DEFAULTS=0`
turns the defaults off (for measuring them).
"""

import os
from typing import Dict

# name -> value; see benchmarks/README.md ("What was tried") for the measurements.
CPU_DEFAULTS: Dict[str, str] = {}


def configure_xla(defaults: Dict[str, str] = CPU_DEFAULTS) -> str:
  """Adds `defaults` to `XLA_FLAGS` where the user has not set them.

  Args:
    defaults: flag name (without `--`) -> value.

  Returns:
    The resulting `XLA_FLAGS`.

  Raises:
    RuntimeError: if JAX has already started a backend, when the flags would be
      silently ignored.
  """
  import sys  # pylint: disable=g-import-not-at-top
  jax_module = sys.modules.get("jax")
  if jax_module is not None and _backends_started(jax_module):
    raise RuntimeError("gta_jax.runtime.configure_xla() must run before JAX starts a "
                       "backend (before the first jax.devices() or computation)")
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("GTA_JAX_XLA_DEFAULTS", "1") != "0":
    present = {f.lstrip("-").split("=", 1)[0] for f in flags.split()}
    extra = [f"--{k}={v}" for k, v in defaults.items() if k not in present]
    flags = " ".join([flags] + extra).strip()
    os.environ["XLA_FLAGS"] = flags
  return flags


def _backends_started(jax_module) -> bool:
  try:
    return bool(jax_module._src.xla_bridge._backends)  # pylint: disable=protected-access
  except AttributeError:
    return False
