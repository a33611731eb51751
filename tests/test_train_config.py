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
    ("nonfinite", "ignore", "config.nonfinite must be one of"),
    ("nonfinite_skip_batches", -1, "config.nonfinite_skip_batches"),
    ("nonfinite_max_rollbacks", -1, "config.nonfinite_max_rollbacks"),
    ("lease_timeout_s", 0.0, "config.lease_timeout_s"),
    ("data.max_bad_clips", -1, "config.data.max_bad_clips"),
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


@pytest.mark.parametrize("key,value,match", [
    ("text.encoder", "bert", "config.text.encoder"),
    ("retrieval.projection", "mlp", "config.retrieval.projection"),
    ("retrieval.video_encoder", "partial", "config.retrieval.video_encoder"),
    ("text.heads", 0, "config.text.heads"),
    ("retrieval.embed_dim", 0, "config.retrieval.embed_dim"),
])
def test_retrieval_values_are_checked(key, value, match):
  c = config_lib.retrieval_synthetic_config("gta")
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    state_lib.build(c)


def test_unknown_task_is_named():
  from gta_jax import tasks  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.task = "captioning"
  with pytest.raises(ValueError, match="config.task"):
    tasks.score_key(c)


def test_the_shipped_retrieval_configs_build():
  """The embedded recipes train their video network; the MSR-VTT and YouCook2 ones
  take a frozen SSA-R50's 2048-d features (the tiny net's res5: 8 x 8 x 4 = 256)."""
  import msrvtt_ssa_r50_retrieval  # pylint: disable=g-import-not-at-top
  import retrieval_synthetic_ssa  # pylint: disable=g-import-not-at-top
  import youcook2_ssa_r50_retrieval  # pylint: disable=g-import-not-at-top
  for module, frozen in ((retrieval_synthetic_ssa, False), (msrvtt_ssa_r50_retrieval, True),
                         (youcook2_ssa_r50_retrieval, True)):
    c = module.get_config()
    loop.check_config(c)
    _, _, _, abstract = state_lib.build(c)
    assert ("video" not in abstract.params) == frozen
    assert abstract.params["video_proj"]["fc"]["kernel"].shape == (
        (2048 if frozen else 256), c.retrieval.embed_dim)
