"""Second Python environments for the tests that compare with peers' code.

The project never imports PyTorch, mmaction2 or jax2onnx. Tests that need them run a
script in another python, found as

* the python named by an environment variable (it must have the modules), or
* `<repo>/<venv>/bin/python` when it has them (`.venv*/` is git-ignored), or
* in CI (`CI=true`), that venv created or completed by the test's own recipe, under a
  lock so that parallel workers do not race.

Elsewhere, without either, `find_python` returns None and the tests skip with the
reason.
"""

import fcntl
import os
import subprocess
import tempfile
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_ci() -> bool:
  """Whether this is a CI run, which installs what the peer tests need."""
  return os.environ.get("CI", "").lower() == "true"


def has_modules(python: str, modules: Sequence[str]) -> bool:
  """Whether `python` finds every one of `modules` (found, not imported)."""
  check = (f"import importlib.util as u, sys; "
           f"sys.exit(not all(u.find_spec(m) for m in {tuple(modules)!r}))")
  return subprocess.run([python, "-c", check], capture_output=True).returncode == 0


def pip_install(python: str, *args: str, timeout: int = 900) -> None:
  """`python -m pip install --quiet ARGS`."""
  subprocess.run([python, "-m", "pip", "install", "--quiet", *args], check=True,
                 timeout=timeout)


def find_python(env_var: str, venv: str, modules: Sequence[str],
                create: Callable[[str], None]) -> Optional[str]:
  """A python that has `modules`, or None (see the module docstring).

  Args:
    env_var: the environment variable that may name a python.
    venv: the venv's folder name in the repository, e.g. ".venv-torch".
    modules: the modules the python must find.
    create: in CI, called with the venv's python path (which may not exist yet) to
      create or complete the venv, under a lock.

  Raises:
    RuntimeError: the python named by `env_var` lacks one of `modules`.
  """
  python = os.environ.get(env_var)
  if python:
    if not has_modules(python, modules):
      raise RuntimeError(f"{env_var}={python} lacks one of {', '.join(modules)}")
    return python
  python = os.path.join(REPO, venv, "bin", "python")
  if os.path.exists(python) and has_modules(python, modules):
    return python
  if not in_ci():
    return None
  lock_path = os.path.join(tempfile.gettempdir(), f"gta_jax{venv}.lock")
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (os.path.exists(python) and has_modules(python, modules)):
      create(python)
  return python
