"""Fine-tuning from a run of this project (`config.init_from`).

The source is the shared tiny GTA run on the embedded data (10 classes, seed 3); the
fine-tuned run is `train.py` on a `video_folder` of 4 classes (seed 0), with all but
the classifier frozen: after training, every other parameter must still be the
source's (a fresh seed-0 model has other values), and the classifier has 4 outputs.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import test_data_builders
from gta_jax.training import checkpoint
from gta_jax.training import finetune
from gta_jax.training import loop
from gta_jax.training import sharding
from gta_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("jump", "run", "swim", "throw")


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def shapes(**arrays):
  return {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in arrays.items()}


def test_merge_loads_reinitialises_and_refuses():
  fresh = shapes(**{"params/stem/kernel": (3, 8), "params/res5/kernel": (8, 8),
                    "params/head/fc/kernel": (8, 4), "batch_stats/stem/mean": (8,)})
  saved = {"params/stem/kernel": np.ones((3, 8)), "params/res5/kernel": np.ones((8, 8)),
           "params/head/fc/kernel": np.ones((8, 10)), "batch_stats/stem/mean": np.ones(8),
           "params/res5/post/g": np.ones(2)}
  merged, report, problems = finetune.merge(fresh, saved, reinit="^res5/")
  assert report.loaded == ["params/stem/kernel", "batch_stats/stem/mean"]
  assert report.reinitialised == {"params/head/fc/kernel": "classifier (8, 10) -> (8, 4)",
                                  "params/res5/kernel": "config.init_reinit"}
  assert report.ignored == ["params/res5/post/g"] and not problems
  assert merged["params/res5/kernel"] is fresh["params/res5/kernel"]
  np.testing.assert_array_equal(merged["params/stem/kernel"], saved["params/stem/kernel"])

  _, _, problems = finetune.merge(dict(fresh, **shapes(**{"params/stem/kernel": (3, 16)})),
                                  saved)
  assert problems == ["params/stem/kernel: (3, 8) in the checkpoint, (3, 16) in the model",
                      "params/res5/post/g: (2,) in the checkpoint, missing in the model"]


def init_shapes(config):
  model = state_lib.build(config)[0]
  return jax.eval_shape(lambda: state_lib.init_variables(model, config, jax.random.key(0)))


@pytest.mark.parametrize("change,named", [
    ({"temporal_modules": "tsm"}, "params/res4_block0/post/"),  # no GTA block
    ({"width": 16}, "params/res2_block0/bn1/bias: (8,) in the checkpoint, (16,) in the "
                    "model"),
])
def test_another_architecture_is_refused_with_the_names(tiny_gta_run, change, named):
  config = tiny_gta_run["config"].copy_and_resolve_references()
  config.model.update(change)
  config.init_from = tiny_gta_run["workdir"]
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="another architecture") as e:
    finetune.load_init_from(init_shapes(config), config)
  assert named in str(e.value)


def test_bad_init_reinit_names_the_key(tiny_gta_run):
  config = tiny_gta_run["config"].copy_and_resolve_references()
  config.init_from, config.init_reinit = tiny_gta_run["workdir"], "res5("
  with pytest.raises(ValueError, match=r"config.init_reinit='res5\(' is not a regex"):
    finetune.load_init_from({}, config)


def test_init_from_paths(tiny_gta_run, tmp_path):
  workdir = tiny_gta_run["workdir"]
  step_dir = os.path.join(workdir, "checkpoints", "0")
  for given in (workdir, os.path.join(workdir, "checkpoints"), step_dir):
    assert str(finetune.find_step_dir(given)) == step_dir
  with pytest.raises(FileNotFoundError, match="no such folder"):
    finetune.find_step_dir(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    finetune.find_step_dir(str(tmp_path))


@pytest.mark.slow
def test_finetune_on_a_video_folder(tiny_gta_run, tmp_path):
  for label, name in enumerate(CLASSES):
    grey = 30 + 60 * label
    for i in range(2):
      test_data_builders.write_video(tmp_path / "videos" / "train" / name / f"{i}.mp4", grey,
                                     num_frames=8, size=(32, 40))
    test_data_builders.write_video(tmp_path / "videos" / "val" / name / "v.mp4", grey,
                                   num_frames=8, size=(32, 40))
  workdir = tmp_path / "finetuned"
  overrides = {"data.dataset": "video_folder", "data.manual_dir": tmp_path / "videos",
               "data.data_dir": tmp_path / "data", "data.num_frames": 4,
               "data.num_workers": 0, "data.prepare_workers": 1, "model.num_classes": 4,
               "batch_size": 8, "eval.batch_size": 4, "total_steps": 2,
               "log_every_steps": 1, "checkpoint_every_steps": 2, "eval_every_steps": 0,
               "init_from": tiny_gta_run["workdir"], "optim.freeze": "^(?!head/)"}
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/synthetic_gta.py",
       "--workdir", str(workdir), *[f"--config.{k}={v}" for k, v in overrides.items()]],
      capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-5000:]
  log = result.stderr
  assert "re-initialised 2: params/head/fc/bias (classifier (10,) -> (4,))" in log, log[-5000:]
  # Every array of the checkpoint but the two of the classifier.
  assert f"loaded {len(jax.tree.leaves(tiny_gta_run['variables'])) - 2} arrays" in log
  assert "parameter arrays frozen: " in log
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r for r in rows if r["kind"] == "eval"]
  assert evals and evals[-1]["step"] == 2 and evals[-1]["num_videos"] == len(CLASSES)

  # The run's checkpoint wins over init_from (which would fail here).
  config = finetune_config(dict(overrides, init_from=tmp_path / "nowhere"))
  mesh = sharding.make_mesh()
  model, tx, _, abstract = state_lib.build(config, mesh)
  ckpt = checkpoint.Checkpointer(str(workdir))
  state, _ = loop.restore_or_initialize(config, ckpt, abstract, model, tx, mesh, None)
  ckpt.close()
  assert int(state.step) == 2
  got, source = flat(state.params), flat(tiny_gta_run["variables"]["params"])
  assert got["head/fc/kernel"].shape == (256, 4)
  assert any("post/pixel_temporal" in k for k in got)  # the GTA blocks are compared too
  for key, value in got.items():
    if not key.startswith("head/"):
      np.testing.assert_array_equal(value, source[key], err_msg=key)


def finetune_config(overrides):
  """configs/synthetic_gta.py with the `--config.` overrides of the fine-tuned run."""
  import conftest  # pylint: disable=g-import-not-at-top
  import synthetic_gta  # pylint: disable=g-import-not-at-top
  return conftest.set_keys(synthetic_gta.get_config(),
                           {k: str(v) if hasattr(v, "parent") else v
                            for k, v in overrides.items()})
