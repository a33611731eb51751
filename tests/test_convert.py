"""`python -m gta_jax.convert` on small checkpoints in mmaction2's key layout, written
here (no PyTorch): every array lands where it belongs, and a file that does not fit
is refused naming the arrays at fault. Parity with the peers' own networks:
tests/test_convert_torch.py."""

import functools
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from gta_jax import config_lib
from gta_jax import convert
from gta_jax import pretrained
from gta_jax import recipes
from gta_jax.training import checkpoint
from gta_jax.training import finetune

import test_predict  # tests/: write_video, moving_blob

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}


def small_config(temporal_modules="tsm"):
  """A ResNet-50-style network with one block per stage, 8 channels wide."""
  config = config_lib.synthetic_config(temporal_modules)
  config.model.nl.placement = "res3:0;res4:0"
  config.model.nl.sub_sample = True  # mmaction2's configs (the synthetic recipe: False)
  return config


def mmaction2_key(path, tsm=True):
  """mmaction2's key of a flax variable, spelled out from its ResNetTSM/NonLocal3d."""
  _, *modules, leaf = path
  leaf = _LEAVES[leaf]
  if modules[0] == "stem_conv":
    return f"backbone.conv1.conv.{leaf}"
  if modules[0] == "stem_bn":
    return f"backbone.conv1.bn.{leaf}"
  if modules[0] == "head":
    return f"cls_head.fc_cls.{leaf}"
  stage, block = re.fullmatch(r"res(\d)_block(\d+)", modules[0]).groups()
  layer = f"backbone.layer{int(stage) - 1}.{block}"
  if modules[1] == "post":  # NL3DWrapper: the block under .block, the NL beside it
    nonlocal_module = {"theta": "theta.conv", "phi": "phi.0.conv", "g": "g.0.conv",
                       "out": "conv_out.conv", "bn": "conv_out.bn"}[modules[2]]
    return f"{layer}.non_local_block.{nonlocal_module}.{leaf}"
  name = modules[1]
  if name.startswith("conv") or name == "downsample_conv":
    module = "downsample.conv" if name == "downsample_conv" else f"{name}.conv"
    if name == "conv1" and tsm:
      module += ".net"
  else:
    module = "downsample.bn" if name == "downsample_bn" else f"conv{name[-1]}.bn"
  return f"{layer}.{module}.{leaf}"


def torch_layout(value, path):
  """A flax array in PyTorch's layout: (kh, kw, in, out) -> (out, in, kh, kw), a
  Dense (in, out) -> (out, in) (a Non-local projection: (out, in, 1, 1, 1))."""
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if "post" in path:
    return value.T[:, :, None, None, None]
  return value.T


@functools.lru_cache(maxsize=None)
def random_variables(temporal_modules):
  """A small model's variables with every array random, flat by path."""
  shapes = pretrained.variable_shapes(small_config(temporal_modules))
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(shapes)
  return {path: rng.normal(size=s.shape).astype(np.float32) for path, s in flat.items()}


def write_mmaction2_npz(path, temporal_modules="tsm", edit=None):
  """The small model in mmaction2's layout (with a `phi` bias and BN counters)."""
  state = {}
  nonlocal_blocks = set()
  for var_path, value in random_variables(temporal_modules).items():
    key = mmaction2_key(var_path)
    if "post" in var_path:
      nonlocal_blocks.add(var_path[1])
    state[key] = torch_layout(value, var_path)
  for block in sorted(nonlocal_blocks):  # NL3DWrapper puts the wrapped block under .block
    stage, index = re.fullmatch(r"res(\d)_block(\d+)", block).groups()
    layer = f"backbone.layer{int(stage) - 1}.{index}."
    for key in [k for k in state if k.startswith(layer) and "non_local_block" not in k]:
      state[key.replace(layer, layer + "block.")] = state.pop(key)
    state[layer + "non_local_block.phi.0.conv.bias"] = np.ones(4, np.float32)
  for key in [k for k in state if k.endswith("running_var")]:
    state[key] = np.abs(state[key]) + 0.5
    state[key.replace("running_var", "num_batches_tracked")] = np.array(7)
  if edit:
    edit(state)
  np.savez(path, **state)
  return path


@pytest.mark.parametrize("temporal_modules", ["tsm", "tsm,nl"])
def test_every_array_lands_in_its_variable(tmp_path, temporal_modules):
  path = write_mmaction2_npz(tmp_path / "small.npz", temporal_modules)
  config = small_config(temporal_modules)
  variables, plan, renamed = convert.convert_variables(str(path), "mmaction2", config)
  flat = traverse_util.flatten_dict(variables)
  want = random_variables(temporal_modules)
  assert set(flat) == set(want)
  for var_path, value in want.items():
    expected = np.abs(value) + 0.5 if var_path[-1] == "var" else value
    np.testing.assert_array_equal(flat[var_path], expected, err_msg=str(var_path))
  assert len(plan.loaded) == len(want)
  assert {why for _, why in plan.ignored} == {"BatchNorm step counter"}
  if "nl" in temporal_modules:
    assert sorted(renamed.notes) == [
        f"dropped backbone.layer{s}.0.non_local_block.phi.0.conv.bias: the softmax over "
        "the keys cancels phi's bias" for s in (2, 3)]


def test_the_run_restores_as_a_training_run(tmp_path):
  path = write_mmaction2_npz(tmp_path / "small.npz")
  config = small_config()
  workdir = tmp_path / "run"
  lines = convert.convert("mmaction2", str(path), config, "synthetic_tsm", str(workdir))
  assert any("into every variable" in line for line in lines)
  rebuilt = config_lib.from_file(str(workdir / "config.py"))
  assert rebuilt.to_dict() == config.to_dict()  # the recipe plus the overrides
  variables, step = checkpoint.restore_variables(rebuilt, workdir)
  assert step == 0
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  np.testing.assert_array_equal(flat[("params", "res3_block0", "conv1", "conv", "kernel")],
                                random_variables("tsm")[("params", "res3_block0", "conv1",
                                                         "conv", "kernel")])
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.convert("mmaction2", str(path), config, "synthetic_tsm", str(workdir))


def _drop(key):
  return lambda state: state.pop(key)


def _add(key, shape):
  return lambda state: state.__setitem__(key, np.zeros(shape, np.float32))


def _reshape(key):
  return lambda state: state.__setitem__(key, state[key][:, :-1])


@pytest.mark.parametrize("edit,message", [
    (_drop("backbone.layer2.0.conv2.conv.weight"),
     # A missing array has no key in the file: torchvision's name and the variable.
     r"1 arrays missing.*\n  layer2\.0\.conv2\.weight is missing "
     r"\(for res3_block0/conv2/conv\)"),
    (_add("backbone.layer4.0.conv4.conv.weight", (3, 3)),
     r"1 file entries unused.*\n  backbone\.layer4\.0\.conv4\.conv\.weight \(3, 3\) is "
     r"in the file but not in the model"),
    (_reshape("backbone.layer1.0.conv3.conv.weight"),
     r"1 of another shape.*\n  backbone\.layer1\.0\.conv3\.conv\.weight has shape "
     r"\(32, 7, 1, 1\), \(1, 1, 7, 32\) as flax; "
     r"params/res2_block0/conv3/conv/kernel needs \(1, 1, 8, 32\)"),
])
def test_a_file_that_does_not_fit_is_refused_naming_the_arrays(tmp_path, edit, message):
  path = write_mmaction2_npz(tmp_path / "bad.npz", edit=edit)
  with pytest.raises(ValueError, match=message):
    convert.convert_variables(str(path), "mmaction2", small_config())
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    (lambda c: c.model.update(temporal_modules="tsm,nl"),
     r"another architecture than the config \(a ResNet .*\): the file has 0 Non-local "
     r"blocks, the config's model.temporal_modules is 'tsm,nl'"),
    (lambda c: c.model.update(arch="resnet3d"),
     r"the file is a 2D network, the config's model.arch is 'resnet3d'"),
    (lambda c: c.model.update(num_classes=400),
     r"the file's classifier has 10 classes, config.model.num_classes is 400"),
    (lambda c: c.model.update(stage_sizes="1,1,2,1"),
     r"15 arrays missing.*\n  layer3\.1\.bn1\.\{running_mean,running_var,bias,weight\} "
     r"is missing \(for res4_block1/bn1\)\n"),
])
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, change, message):
  path = write_mmaction2_npz(tmp_path / "small.npz")
  config = small_config()
  change(config)
  with pytest.raises(ValueError, match=message):
    convert.convert_variables(str(path), "mmaction2", config)


def test_another_source_layout_is_refused(tmp_path):
  path = write_mmaction2_npz(tmp_path / "small.npz")
  with pytest.raises(ValueError, match=r"not in the tsm layout: no key starts with "
                     r"'base_model\.' \(the first keys are \['backbone\."):
    convert.convert_variables(str(path), "tsm", small_config())


@pytest.mark.parametrize("method", ["gta", "ssa"])
@pytest.mark.parametrize("backbone", ["tsn", "tsm"])
def test_finetune_recipes_take_the_whole_converted_backbone(method, backbone):
  """`k400_<method>_r50_8f_from_<backbone>`: `init_from` a run converted with the
  `k400_<backbone>_r50_mmaction2` recipe fills every variable but the new module's,
  which `init_reinit` names (finetune.merge on the two models' shapes)."""
  recipe = config_lib.from_file(recipes.path(f"k400_{method}_r50_8f_from_{backbone}"))
  source = config_lib.from_file(recipes.path(f"k400_{backbone}_r50_mmaction2"))
  assert recipe.init_from == f"runs/mmaction2_{backbone}_r50_k400"
  fresh = traverse_util.flatten_dict(pretrained.variable_shapes(recipe), sep="/")
  saved = {path: np.zeros(s.shape, s.dtype) for path, s in traverse_util.flatten_dict(
      pretrained.variable_shapes(source), sep="/").items()}
  _, report, problems = finetune.merge(fresh, saved, recipe.init_reinit)
  assert not problems
  assert sorted(report.loaded) == sorted(saved)
  position = {"gta": "/post/", "ssa": "/inner/"}[method]
  assert report.reinitialised and all(position in path for path in report.reinitialised)


@pytest.mark.slow
def test_convert_then_predict_on_the_command_line(tmp_path):
  """The commands of docs/pretrained.md: convert, then predict with the run's config.py
  (predict's numbers against a reference: tests/test_predict.py)."""
  path = write_mmaction2_npz(tmp_path / "small.npz")
  workdir = tmp_path / "run"
  overrides = ["--config.model.nl.placement=res3:0;res4:0",
               "--config.model.nl.sub_sample=True"]
  convert_cmd = [sys.executable, "-m", "gta_jax.convert", "--source=mmaction2",
                 f"--checkpoint={path}", "--config=synthetic_tsm", *overrides,
                 f"--workdir={workdir}"]
  done = subprocess.run(convert_cmd, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"wrote {workdir}/checkpoints/0" in done.stdout
  video = tmp_path / "blob.mp4"
  test_predict.write_video(video, test_predict.moving_blob(11))
  nowhere = tmp_path / "no_data"  # classes by index, wherever the test runs
  predict_cmd = [sys.executable, "-m", "gta_jax.predict", f"--config={workdir}/config.py",
                 f"--config.data.data_dir={nowhere}", f"--workdir={workdir}", "--json",
                 str(video)]
  done = subprocess.run(predict_cmd, capture_output=True, text=True, timeout=300,
                        cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  assert result["checkpoint_step"] == 0
  (prediction,) = result["predictions"]
  assert prediction["video"] == str(video)
  classes = [entry["class"] for entry in prediction["top_k"]]
  assert len(classes) == 5 and set(classes) <= {str(i) for i in range(10)}
  convert_cmd[3] = "--source=tsm"
  refused = subprocess.run(convert_cmd[:-1] + [f"--workdir={tmp_path / 'other'}"],
                           capture_output=True, text=True, timeout=300)
  assert refused.returncode == 1
  assert "error: " in refused.stderr and "not in the tsm layout" in refused.stderr


@pytest.mark.parametrize("given,recorded", [
    ("gs://weights/tsm.pth", "gs://weights/tsm.pth"),  # a URL as given
    ("tsm.pth", "{cwd}/tsm.pth")])  # a local path made absolute
def test_convert_json_records_the_checkpoint_as_given_and_checks_the_workdir_once(
    tmp_path, monkeypatch, given, recorded):
  """The conversion, the train state and its checkpoint are stand-ins: what
  `convert` records in convert.json, and how often it checks the workdir."""
  import os  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  checks = []
  renamed = types.SimpleNamespace(notes=[], state_dict={}, file_name=str)
  plan = types.SimpleNamespace(loaded=["a"], ignored=[])
  monkeypatch.setattr(convert, "convert_variables", lambda *unused: ({}, plan, renamed))
  monkeypatch.setattr(convert, "sha256", lambda unused: "0" * 64)
  monkeypatch.setattr(convert, "config_file_text", lambda *unused: "")
  monkeypatch.setattr(convert, "check_new_workdir", checks.append)
  monkeypatch.setattr(pretrained, "describe_file", lambda unused: "")
  monkeypatch.setattr(state_lib, "build", lambda unused: (None,) * 4)
  monkeypatch.setattr(state_lib, "create_train_state", lambda *unused: None)
  monkeypatch.setattr(checkpoint, "Checkpointer", lambda workdir, keep: types.SimpleNamespace(
      save=lambda *unused: os.makedirs(os.path.join(workdir, "checkpoints", "0")),
      wait=lambda: None, close=lambda: None))
  convert.convert("mmaction2", given, small_config(), "synthetic_tsm", "run")
  with open(tmp_path / "run" / "convert.json") as f:
    assert json.load(f)["checkpoint"] == recorded.format(cwd=os.getcwd())
  assert checks == ["run"]
