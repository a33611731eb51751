"""Bad config values fail early with a message naming the key."""

import pytest

from gta_jax import config_lib
from gta_jax.training import loop
from gta_jax.training import state as state_lib


def tiny_config():
  c = config_lib.synthetic_config("tsm")
  c.data.num_frames = 4
  return c


@pytest.mark.parametrize("key,value,match", [
    ("total_steps", 0, "config.total_steps"),
    ("log_every_steps", -1, "config.log_every_steps"),
    ("eval_every_steps", -5, "config.eval_every_steps"),
    ("batch_size", 0, "config.batch_size"),
    ("eval.batch_size", 0, "config.eval.batch_size"),
    ("optim.label_smoothing", 1.0, "config.optim.label_smoothing"),
])
def test_loop_settings_are_checked(key, value, match):
  c = tiny_config()
  section, _, name = key.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    loop.check_config(c)


@pytest.mark.parametrize("key,value,match", [
    ("model.temporal_modules", "tsm,foo", "config.model.temporal_modules"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("optim.schedule", "linear", "config.optim.schedule"),
    ("optim.name", "lamb", "config.optim.name"),
])
def test_model_and_optimizer_values_are_checked(key, value, match):
  c = tiny_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    state_lib.build(c)


def test_the_shipped_synthetic_configs_build():
  for modules in ("", "tsm", "gta", "ssa"):
    c = config_lib.synthetic_config(modules)
    loop.check_config(c)
    _, _, _, abstract = state_lib.build(c)
    assert abstract.params["head"]["fc"]["kernel"].shape[-1] == c.model.num_classes
