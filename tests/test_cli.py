"""The process the command-line tools run in (`gta_jax.cli.use_huge_pages`)."""

import os
import subprocess
import sys

import pytest

from gta_jax import cli

SCRIPT = """
import os, sys
print("started", flush=True)
from gta_jax import cli
cli.use_huge_pages()
print("tunables", repr(os.environ.get("GLIBC_TUNABLES")), "argv", sys.argv[1:])
"""


def run_script(**env_changes):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", cli.HUGE_PAGES_ENV)}
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag", "a b"], env=env,
                       capture_output=True, text=True, check=True).stdout
  return out.splitlines()


@pytest.mark.skipif(not cli.glibc_has_hugetlb(), reason="needs Linux with glibc 2.35+")
def test_reexecutes_once_with_huge_pages_and_the_same_arguments():
  lines = run_script()
  assert lines == ["started", "started",
                   f"tunables '{cli.HUGE_PAGES_TUNABLE}' argv ['--flag', 'a b']"]


@pytest.mark.skipif(not cli.glibc_has_hugetlb(), reason="needs Linux with glibc 2.35+")
def test_keeps_the_tunables_already_set():
  lines = run_script(GLIBC_TUNABLES="glibc.malloc.trim_threshold=4096")
  assert lines[-1] == ("tunables 'glibc.malloc.trim_threshold=4096:"
                       f"{cli.HUGE_PAGES_TUNABLE}' argv ['--flag', 'a b']")


@pytest.mark.parametrize("env", [{cli.HUGE_PAGES_ENV: "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                 {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"}])
def test_leaves_the_process_alone_when_told_or_already_set(env):
  lines = run_script(**env)
  assert lines == ["started", f"tunables {env.get('GLIBC_TUNABLES')!r} argv ['--flag', 'a b']"]
