"""Shared pytest fixtures and settings."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

from gta_jax import recipes

# Tests import the recipes (gta_jax/recipes/, configs/ in the repository) by name.
sys.path.insert(0, recipes.DIRECTORY)

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

TINY_GTA_SEED = 3  # not the configs' seed 0: a fresh model differs from this run


def set_keys(config, overrides):
  """Sets dotted `overrides` (`{'data.num_frames': 4}`) on an ml_collections config."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def tiny_gta_run(tmp_path_factory):
  """A run of configs/synthetic_gta.py with a checkpoint at step 0 (seed 3, classifier
  spread so that the probabilities are far from uniform) on a prepared synthetic
  dataset of 1 video per class and split; 4 frames, 2 eval clips.

  Returns:
    dict(config=, overrides= (the `--config.` keys the CLIs need), workdir=, root=,
    variables= (host arrays)).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import synthetic_gta  # pylint: disable=g-import-not-at-top
  from gta_jax.data import preparation  # pylint: disable=g-import-not-at-top
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny_gta")
  overrides = {"data.data_dir": str(root / "data"), "data.num_frames": 4,
               "data.synthetic.train_per_class": 1, "data.synthetic.val_per_class": 1,
               "data.num_workers": 0, "eval.num_clips": 2, "seed": TINY_GTA_SEED}
  config = set_keys(synthetic_gta.get_config(), overrides)
  preparation.prepare_dataset(config)
  mesh = sharding.make_mesh()
  model, tx, _, _ = state_lib.build(config, mesh)
  state = state_lib.initial_state(config, model, tx, mesh)
  fc = state.params["head"]["fc"]
  params = dict(state.params, head=dict(fc=dict(
      kernel=fc["kernel"] * 30,
      bias=np.linspace(-1.0, 1.0, config.model.num_classes, dtype=np.float32))))
  state = state.replace(params=params)
  ckpt = checkpoint.Checkpointer(str(root / "run"))
  ckpt.save(0, state, None, config)
  ckpt.wait()
  ckpt.close()
  return dict(config=config, overrides=overrides, workdir=str(root / "run"), root=root,
              variables=jax.device_get(state.variables))


@pytest.fixture(scope="module")
def bucket():
  """A local GCS emulator with `gs://bucket` (tests/gcs_emulator.py); this module's
  tests and their children use it. `bucket.faulty(...)` makes it fail requests for a while."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator.serve("bucket") as emulator:
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
      yield emulator
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
