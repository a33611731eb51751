"""Shared pytest fixtures and settings."""

import atexit
import os
import shutil
import sys
import tempfile

# The configs/ folder holds recipe files that tests load by name.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

# Compilation dominates the suite's time on a 2-core CPU, so the session (this
# process and, through the environment, every train.py/eval.py/benchmark it starts)
# shares one XLA compilation cache: the many 10-step runs of one tiny config compile
# each program once (measured under load: a 10-step train.py run 37 s cold, 23 s
# warm). Random bits come from the non-partitionable threefry, which XLA:CPU compiles
# about 3x faster (the tiny GTA model's init: 27 s -> 9 s; an SSA-R50 test 79 s ->
# 61 s of CPU). Values differ from the default threefry, results in distribution do
# not, and both give the same values on any device count. Set either variable to
# override.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="gta_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
