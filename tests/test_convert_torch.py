"""Converted video checkpoints give the peer's own logits.

mmaction2 builds each model from its own released config (random weights, random
BatchNorm statistics and affine parameters, so that every tensor matters), saves it
in its checkpoint format (`{'meta': ..., 'state_dict': ...}`) and computes eval-mode
logits on a random clip; `python -m gta_jax.convert` turns the file into a run, and
the run's restored variables give the same logits here (1e-4 of the largest logit,
float32). The TSM authors' layout (`--source=tsm`) is checked against a PyTorch
re-derivation of their network written below (torchvision's ResNet-50 with their
shift wrapper `conv1.net`, `base_model.`/`new_fc.` names and their Non-local block
`nl.{g,theta,phi,W}` with sub-sampling), since their repository is no package.

The peer environment is `tests/test_pretrained_torch.py`'s torch venv plus
mmengine 0.10.7, mmcv-lite 2.2.0 and mmaction2 1.2.0 (without its dependencies;
CI installs them into `.venv-torch`: 11 s with a warm pip cache). Three shims, in
the script below, let mmaction2's models import there: mmcv-lite reports 2.1.0 (mmaction2 1.2.0
refuses 2.2.0, which it has not seen), its `localizers.drn` package (missing from
the 1.2.0 wheel) is an empty module, and only `mmaction.models` is imported (the
datasets need decord and scipy). Without torch the tests are skipped.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax import convert
from gta_jax import recipes
from gta_jax.models import build_model
from gta_jax.training import checkpoint

import peer_envs  # tests/
import test_pretrained_torch  # tests/: the torch venv

MM_PACKAGES = ("mmengine==0.10.7", "mmcv-lite==2.2.0", "einops", "importlib_metadata")
MMACTION2 = "mmaction2==1.2.0"

# recipe -> (mmaction2 config, clip frames). The clip is 2 x T x 64 x 64.
MODELS = {
    "k400_tsn_r50_mmaction2": (
        "tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb", 3),
    "k400_tsm_r50_mmaction2": (
        "tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb", 8),
    "k400_tsm_nl_r50_mmaction2": (
        "tsm/tsm_imagenet-pretrained-r50-nl-embedded-gaussian_8xb16-1x1x8-50e_"
        "kinetics400-rgb", 8),
    "k400_i3d_r50_mmaction2": (
        "i3d/i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb", 32),
    "k400_slowonly_r50_8x8_mmaction2": (
        "slowonly/slowonly_imagenet-pretrained-r50_8xb16-8x8x1-steplr-150e_"
        "kinetics400-rgb", 8),
}
SIZE = 64

# Runs in the peer environment: argv = out folder, then `recipe=config:frames` items.
PEER_SCRIPT = r"""
import os, sys, types, json
import numpy as np
import torch
import mmcv
mmcv.__version__ = "2.1.0"  # mmaction2 1.2.0 asserts mmcv < 2.2.0
for name in ("mmaction.models.localizers.drn", "mmaction.models.localizers.drn.drn"):
  stub = types.ModuleType(name); stub.DRN = None; stub.__path__ = []
  sys.modules[name] = stub  # missing from the 1.2.0 wheel
import mmaction
import mmaction.models  # registers the models; the datasets need decord and scipy
from mmaction.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

init_default_scope("mmaction")
out, size = sys.argv[1], int(sys.argv[2])
configs = os.path.join(os.path.dirname(mmaction.__file__), ".mim", "configs", "recognition")
for item in sys.argv[3:]:
  recipe, spec = item.split("=")
  config_name, frames = spec.split(":")
  torch.manual_seed(0)
  cfg = Config.fromfile(os.path.join(configs, config_name + ".py"))
  cfg.model.backbone.pretrained = None  # nothing is downloaded
  model = MODELS.build(cfg.model)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
      elif isinstance(module, (torch.nn.Conv3d, torch.nn.Linear)) and module.bias is not None:
        module.bias.normal_(0, 0.1)
  model.eval()
  torch.save({"meta": {"mmaction2": mmaction.__version__, "config": config_name},
              "state_dict": model.state_dict()}, f"{out}/{recipe}.pth")
  clip = torch.randn(2, int(frames), 3, size, size)  # (N, T, C, H, W), normalised
  if cfg.model.type == "Recognizer3D":
    inputs = clip.permute(0, 2, 1, 3, 4)[:, None]  # (N, 1 view, C, T, H, W)
  else:
    inputs = clip  # (N, T segments, C, H, W)
  with torch.no_grad():
    logits, _ = model.extract_feat(inputs, stage="head")  # eval mode: no dropout
  np.save(f"{out}/{recipe}_clip.npy", clip.numpy().transpose(0, 1, 3, 4, 2))
  np.save(f"{out}/{recipe}_logits.npy", logits.numpy())
  print(recipe, tuple(logits.shape), flush=True)
"""


@functools.lru_cache(maxsize=None)
def peer_python():
  """The torch python with mmaction2 (installed in CI), or None."""
  python = test_pretrained_torch.torch_python()
  if python is None or peer_envs.has_modules(python, ("mmaction", "mmengine")):
    return python
  if not peer_envs.in_ci():
    return None
  peer_envs.pip_install(python, *MM_PACKAGES, timeout=300)
  peer_envs.pip_install(python, "--no-deps", MMACTION2, timeout=300)
  return python


def _skip_reason():
  return (f"mmaction2 absent: {test_pretrained_torch.TORCH_VENV}/bin/pip install "
          f"{' '.join(MM_PACKAGES)} && .venv-torch/bin/pip install --no-deps "
          f"{MMACTION2} (CI=true installs it)")


@pytest.fixture(scope="module")
def peer_outputs(tmp_path_factory):
  python = peer_python()
  if python is None:
    pytest.skip(_skip_reason())
  out = tmp_path_factory.mktemp("mmaction2")
  items = [f"{recipe}={name}:{frames}" for recipe, (name, frames) in MODELS.items()]
  subprocess.run([python, "-c", PEER_SCRIPT, str(out), str(SIZE), *items], check=True,
                 timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  return out


def logits_of_run(workdir, config_path, clip):
  """The logits the converted run gives: its config file, its restored variables."""
  config = config_lib.from_file(config_path)
  config.data.crop_size = clip.shape[2]
  variables, step = checkpoint.restore_variables(config, workdir)
  assert step == 0
  model = build_model(config)
  return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, clip))


def assert_run_gives_peer_logits(workdir, outputs, name, what):
  """The converted run's logits on the peer's clip `outputs/<name>_clip.npy` equal the
  peer's `outputs/<name>_logits.npy` (1e-4 of the largest logit)."""
  clip = np.load(outputs / f"{name}_clip.npy")
  logits = logits_of_run(workdir, workdir / "config.py", clip)
  reference = np.load(outputs / f"{name}_logits.npy")
  assert logits.shape == reference.shape == (2, 400)
  relative = np.abs(logits - reference).max() / np.abs(reference).max()
  print(f"{what}: max |diff| / max |logit| = {relative:.2e}")
  assert relative < 1e-4, relative


def convert_in_process(source, pth, recipe, workdir):
  """`python -m gta_jax.convert` without a new process (its flags, its function)."""
  config = config_lib.from_file(recipes.path(recipe))
  return "\n".join(convert.convert(source, str(pth), config, recipe, str(workdir)))


def convert_cli(source, pth, recipe, workdir):
  result = subprocess.run(
      [sys.executable, "-m", "gta_jax.convert", f"--source={source}",
       f"--checkpoint={pth}", f"--config={recipe}", f"--workdir={workdir}"],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(MODELS))
def test_converted_mmaction2_checkpoint_gives_mmaction2_logits(peer_outputs, recipe,
                                                               tmp_path):
  pth = peer_outputs / f"{recipe}.pth"
  # The command line once (TSM); the same function in this process for the others.
  run = convert_cli if recipe == "k400_tsm_r50_mmaction2" else convert_in_process
  printed = run("mmaction2", pth, recipe, tmp_path)
  assert "into every variable" in printed
  provenance = json.loads((tmp_path / "convert.json").read_text())
  assert provenance["source"] == "mmaction2" and provenance["config"] == recipe
  assert_run_gives_peer_logits(tmp_path, peer_outputs, recipe, recipe)


# Runs in the torch environment: the TSM authors' network (ops/models.py,
# ops/temporal_shift.py, ops/non_local.py of mit-han-lab/temporal-shift-module),
# re-derived on torchvision's ResNet with one bottleneck block per stage, their
# names, random weights and BN statistics; saved as their main.py saves
# (`{'epoch', 'arch', 'state_dict', 'best_prec1'}`, DataParallel's `module.`).
TSM_SCRIPT = r"""
import sys
import numpy as np
import torch
from torch import nn
import torchvision

out, size, segments = sys.argv[1], int(sys.argv[2]), 8


class TemporalShift(nn.Module):  # their blockres shift: wraps conv1 as `.net`
  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, x):
    nt, c, h, w = x.shape
    x = x.view(nt // segments, segments, c, h, w)
    fold = c // 8
    shifted = torch.zeros_like(x)
    shifted[:, :-1, :fold] = x[:, 1:, :fold]  # shift left
    shifted[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]  # shift right
    shifted[:, :, 2 * fold:] = x[:, :, 2 * fold:]
    return self.net(shifted.view(nt, c, h, w))


class NonLocal3D(nn.Module):  # embedded Gaussian, sub_sample=True, bn_layer=True
  def __init__(self, channels):
    super().__init__()
    inter = self.inter = channels // 2
    pool = nn.MaxPool3d(kernel_size=(1, 2, 2))
    self.g = nn.Sequential(nn.Conv3d(channels, inter, 1), pool)
    self.theta = nn.Conv3d(channels, inter, 1)
    self.phi = nn.Sequential(nn.Conv3d(channels, inter, 1), pool)
    self.W = nn.Sequential(nn.Conv3d(inter, channels, 1), nn.BatchNorm3d(channels))

  def forward(self, x):
    b = x.shape[0]
    g_x = self.g(x).view(b, self.inter, -1).permute(0, 2, 1)
    theta_x = self.theta(x).view(b, self.inter, -1).permute(0, 2, 1)
    phi_x = self.phi(x).view(b, self.inter, -1)
    y = torch.softmax(theta_x @ phi_x, dim=-1) @ g_x
    y = y.permute(0, 2, 1).contiguous().view(b, self.inter, *x.shape[2:])
    return self.W(y) + x


class NL3DWrapper(nn.Module):
  def __init__(self, block):
    super().__init__()
    self.block = block
    self.nl = NonLocal3D(block.bn3.num_features)

  def forward(self, x):
    x = self.block(x)
    nt, c, h, w = x.shape
    x = x.view(nt // segments, segments, c, h, w).transpose(1, 2)
    x = self.nl(x)
    return x.transpose(1, 2).contiguous().view(nt, c, h, w)


class TSN(nn.Module):
  def __init__(self, nonlocal_blocks):
    super().__init__()
    self.base_model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
    for layer in (self.base_model.layer1, self.base_model.layer2,
                  self.base_model.layer3, self.base_model.layer4):
      layer[0].conv1 = TemporalShift(layer[0].conv1)
    if nonlocal_blocks:
      self.base_model.layer2[0] = NL3DWrapper(self.base_model.layer2[0])
      self.base_model.layer3[0] = NL3DWrapper(self.base_model.layer3[0])
    self.base_model.fc = nn.Dropout(0.5)
    self.new_fc = nn.Linear(2048, 400)

  def forward(self, clip):  # (N, T, C, H, W)
    n, t = clip.shape[:2]
    logits = self.new_fc(self.base_model(clip.flatten(0, 1)))
    return logits.view(n, t, -1).mean(dim=1)


for name, nonlocal_blocks in (("tsm", False), ("tsm_nl", True)):
  torch.manual_seed(1)
  model = TSN(nonlocal_blocks)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
      elif isinstance(module, (nn.Conv3d, nn.Linear)) and module.bias is not None:
        module.bias.normal_(0, 0.1)
  model.eval()
  state = {"module." + k: v for k, v in model.state_dict().items()}
  torch.save({"epoch": 50, "arch": "resnet50", "state_dict": state, "best_prec1": 0.0},
             f"{out}/{name}.pth.tar")
  clip = torch.randn(2, segments, 3, size, size)
  with torch.no_grad():
    logits = model(clip)
  np.save(f"{out}/{name}_clip.npy", clip.numpy().transpose(0, 1, 3, 4, 2))
  np.save(f"{out}/{name}_logits.npy", logits.numpy())
"""

# The TSM authors' fixture -> the recipe it is converted with, one block per stage.
TSM_RECIPES = {
    "tsm": ("k400_tsm_r50_8f", {}),
    "tsm_nl": ("k400_tsm_nl_r50_mmaction2", {"model.nl.placement": "res3:0;res4:0"}),
}


@pytest.fixture(scope="module")
def tsm_outputs(tmp_path_factory):
  python = test_pretrained_torch.torch_python()
  if python is None:
    pytest.skip("PyTorch venv absent (see tests/test_pretrained_torch.py)")
  out = tmp_path_factory.mktemp("tsm_authors")
  subprocess.run([python, "-c", TSM_SCRIPT, str(out), str(SIZE)], check=True,
                 timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  return out


@pytest.mark.parametrize("name", list(TSM_RECIPES))
def test_converted_tsm_authors_checkpoint_gives_their_logits(tsm_outputs, name, tmp_path):
  recipe, overrides = TSM_RECIPES[name]
  config = config_lib.from_file(recipes.path(recipe))
  config.update_from_flattened_dict({"model.stage_sizes": "1,1,1,1", **overrides})
  printed = convert.convert("tsm", str(tsm_outputs / f"{name}.pth.tar"), config, recipe,
                            str(tmp_path))
  if name == "tsm_nl":  # the output conv's bias, folded into its BatchNorm
    assert sum("folded base_model.layer" in line for line in printed) == 2
  assert_run_gives_peer_logits(tmp_path, tsm_outputs, name, f"TSM authors' {name}")
