"""Parity with PyTorch: torchvision's ResNet-50 and ours give the same logits from one
`.pth` file, and `.pth` files written by torch.save read back exactly.

PyTorch never enters the project's environment: a script runs in a separate Python
that has torch and torchvision, found as

* `$GTA_JAX_TORCH_PYTHON`, a python with torch and torchvision, or
* `<repo>/.venv-torch/bin/python` (`.venv*/` is git-ignored). In CI (`CI=true`) it is
  created when absent: `python -m venv .venv-torch && .venv-torch/bin/pip install
  torch==2.14.1 torchvision==0.29.1`.

Elsewhere, without either, the tests are skipped with the reason.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax import pretrained
from gta_jax import torch_pickle
from gta_jax.models import build_model

import peer_envs  # tests/

REPO = peer_envs.REPO
TORCH_VENV = os.path.join(REPO, ".venv-torch")
TORCH_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1")

# Runs in the torch environment: random torchvision ResNet-50 weights (BN statistics
# and affine parameters too, so that every mapped tensor matters), its eval-mode
# logits on a random batch, and files of strided views (zip and legacy formats).
TORCH_SCRIPT = r"""
import sys
import numpy as np
import torch
import torchvision

out = sys.argv[1]
torch.manual_seed(0)
model = torchvision.models.resnet50()
with torch.no_grad():
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.weight.uniform_(0.5, 1.5)
      module.bias.normal_(0, 0.1)
      module.running_mean.normal_(0, 0.1)
      module.running_var.uniform_(0.5, 2.0)
  model.fc.bias.normal_(0, 0.1)
model.eval()
torch.save(model.state_dict(), f"{out}/resnet50.pth")
x = torch.randn(2, 3, 160, 160)
with torch.no_grad():
  logits = model(x)
np.save(f"{out}/input.npy", x.numpy())
np.save(f"{out}/logits.npy", logits.numpy())

grid = torch.arange(24, dtype=torch.float32).reshape(4, 6)
views = {"grid": grid, "transposed": grid.t(), "corner": grid[1:, 2:],
         "half": grid.half(), "bf16": grid.bfloat16(), "long": torch.arange(5),
         "param": torch.nn.Parameter(grid)}
torch.save(views, f"{out}/views.pth")
torch.save(views, f"{out}/views_legacy.pth", _use_new_zipfile_serialization=False)
"""


def _create_torch_venv(python):
  """Creates `.venv-torch` with torch and torchvision (CI only)."""
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", TORCH_VENV], check=True)
  peer_envs.pip_install(python, *TORCH_PACKAGES)


@functools.lru_cache(maxsize=None)
def torch_python():
  """A python with torch and torchvision, or None."""
  return peer_envs.find_python("GTA_JAX_TORCH_PYTHON", ".venv-torch",
                               ("torch", "torchvision"), _create_torch_venv)


@pytest.fixture(scope="module")
def torch_outputs(tmp_path_factory):
  python = torch_python()
  if python is None:
    pytest.skip(f"PyTorch venv absent: create it with `python3 -m venv {TORCH_VENV} && "
                f"{TORCH_VENV}/bin/pip install {' '.join(TORCH_PACKAGES)}`, or set "
                "GTA_JAX_TORCH_PYTHON to a python with torch (CI=true creates it)")
  out = tmp_path_factory.mktemp("torch")
  subprocess.run([python, "-c", TORCH_SCRIPT, str(out)], check=True, timeout=300,
                 env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  return out


def test_resnet50_reproduces_torchvision_logits(torch_outputs):
  config = config_lib.base_config()
  config.data.num_frames = 1
  config.model.update(dict(arch="resnet2d", depth=50, num_classes=1000))
  model = build_model(config)
  x = np.load(torch_outputs / "input.npy")  # (B, 3, H, W)
  video = jnp.asarray(x.transpose(0, 2, 3, 1)[:, None])  # (B, T=1, H, W, 3)
  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), video)
  variables = pretrained.load_pretrained(abstract, str(torch_outputs / "resnet50.pth"),
                                         config)
  # Every variable came from the file (none is left a shape struct).
  assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(variables))
  logits = np.asarray(jax.jit(functools.partial(model.apply, train=False))(
      variables, video))
  reference = np.load(torch_outputs / "logits.npy")
  assert logits.shape == reference.shape == (2, 1000)
  relative = np.abs(logits - reference).max() / np.abs(reference).max()
  print(f"ResNet-50 logits vs torchvision: max |diff| / max |logit| = {relative:.2e}")
  assert relative < 1e-4, relative


@pytest.mark.parametrize("name", ["views.pth", "views_legacy.pth"])
def test_pth_from_torch_save_reads_back_exactly(torch_outputs, name):
  loaded = torch_pickle.load(torch_outputs / name)
  grid = np.arange(24, dtype=np.float32).reshape(4, 6)
  np.testing.assert_array_equal(loaded["grid"], grid)
  np.testing.assert_array_equal(loaded["transposed"], grid.T)
  np.testing.assert_array_equal(loaded["corner"], grid[1:, 2:])
  np.testing.assert_array_equal(loaded["param"], grid)
  np.testing.assert_array_equal(loaded["long"], np.arange(5))
  assert loaded["half"].dtype == np.float16 and loaded["long"].dtype == np.int64
  np.testing.assert_array_equal(loaded["half"], grid)
  assert loaded["bf16"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(loaded["bf16"].astype(np.float32), grid)
