"""ONNX export (`python -m gta_jax.export --format=onnx`): onnxruntime's logits from the
files of a TSN and a GTA checkpoint equal `model.apply`'s.

jax2onnx declares `orbax-checkpoint<0.11.37`, which this project's orbax rules out,
so the export runs in a second environment, found as

* `$GTA_JAX_ONNX_PYTHON`, a python that imports gta_jax, jax2onnx and onnxruntime, or
* `<repo>/.venv-onnx/bin/python` (`.venv*/` is git-ignored). In CI (`CI=true`) it is
  created when absent, as docs/features.md ("ONNX") does it by hand: a virtual
  environment of the base interpreter that sees this one through a `.pth` line
  (`site.addsitedir`), with the `onnx` extra's packages (pyproject.toml) and jax2onnx
  installed without its requirements (`export.JAX2ONNX`). About 10 s, 40 MB.

Elsewhere, without either, those tests are skipped with the reason.
"""

import functools
import importlib.util
import os
import subprocess
import sys
import sysconfig
import textwrap
import tomllib

import jax
import numpy as np
import pytest

from gta_jax import export
from gta_jax.models import registry
from gta_jax.training import checkpoint
from gta_jax.training import sharding
from gta_jax.training import state as state_lib

from conftest import set_keys
import peer_envs
import synthetic_gta
import synthetic_tsn

REPO = peer_envs.REPO
ONNX_VENV = os.path.join(REPO, ".venv-onnx")
NUM_FRAMES = 4

# Runs in the ONNX environment without gta_jax or JAX: onnxruntime's logits for a
# batch of clips (3: not the batch of 2 the export command checks itself with).
SCORE = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"clips": np.load(sys.argv[2])})
    np.save(sys.argv[3], logits)
    print("jax" in sys.modules, "gta_jax" in sys.modules)
""")


def onnx_packages():
  """The `onnx` extra of pyproject.toml, then jax2onnx (installed without its
  requirements)."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["onnx"]
  return extra, export.JAX2ONNX


def _create_onnx_venv(python):
  """Creates `.venv-onnx` (CI only): it sees this environment through a `.pth` line
  and adds the `onnx` extra's packages and jax2onnx without its requirements."""
  if not os.path.exists(python):
    base = sys._base_executable  # pylint: disable=protected-access
    subprocess.run([base, "-m", "venv", ONNX_VENV], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "gta_jax_env.pth"), "w") as f:
      f.write(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
  extra, jax2onnx = onnx_packages()
  peer_envs.pip_install(python, *extra, timeout=600)
  peer_envs.pip_install(python, "--no-deps", jax2onnx, timeout=600)


@functools.lru_cache(maxsize=None)
def onnx_python():
  """A python with gta_jax, jax2onnx and onnxruntime, or None."""
  return peer_envs.find_python("GTA_JAX_ONNX_PYTHON", ".venv-onnx",
                               ("gta_jax", "jax2onnx", "onnxruntime"), _create_onnx_venv)


def perturbed(variables, rng):
  """Every leaf moved off its initial value, so that no branch is left out by a zero
  initialisation (the last BN scale of a residual block, GTA's output): BN variances
  scaled by U(0.5, 2), the others moved by a tenth of their spread (of 1 when
  constant)."""
  def move(path, leaf):
    leaf = np.asarray(leaf)
    if path[-1].key == "var":
      return (leaf * rng.uniform(0.5, 2.0, leaf.shape)).astype(leaf.dtype)
    scale = 0.1 * (leaf.std() if leaf.std() > 0 else 1.0)
    return (leaf + scale * rng.normal(size=leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(move, variables)


def write_checkpoint(config, workdir):
  """A checkpoint at step 0 of `config` with :func:`perturbed` variables and a
  classifier that spreads the logits; returns the variables."""
  mesh = sharding.make_mesh()
  model, tx, _, _ = state_lib.build(config, mesh)
  state = state_lib.initial_state(config, model, tx, mesh)
  variables = perturbed(jax.device_get(state.variables), np.random.default_rng(0))
  variables["params"]["head"]["fc"]["kernel"] *= 30  # logits far apart
  state = state.replace(**variables)
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(0, state, None, config)
  ckpt.wait()
  ckpt.close()
  return variables


# TSN with the ImageNet stem of the R50 recipes (a 7x7 convolution and a padded 3x3
# max-pool, both of stride 2), GTA with the recipe's 3x3 stem.
CASES = {"synthetic_tsn": {"model.small_stem": False}, "synthetic_gta": {}}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [synthetic_tsn, synthetic_gta],
                         ids=lambda r: r.__name__)
def test_onnxruntime_gives_model_apply_logits(recipe, tmp_path):
  python = onnx_python()
  if python is None:
    extra, jax2onnx = onnx_packages()
    pytest.skip(f"ONNX venv absent: create it as docs/features.md (ONNX) says ({ONNX_VENV}"
                f" seeing this environment, pip install {' '.join(extra)} && pip install "
                f"--no-deps {jax2onnx}), or set GTA_JAX_ONNX_PYTHON (CI=true creates it)")
  overrides = {"data.num_frames": NUM_FRAMES, **CASES[recipe.__name__]}
  config = set_keys(recipe.get_config(), overrides)
  workdir = str(tmp_path / "run")
  variables = write_checkpoint(config, workdir)

  out = tmp_path / "model.onnx"
  result = subprocess.run(
      [python, "-m", "gta_jax.export", "--format=onnx", f"--config={recipe.__name__}",
       *[f"--config.{k}={v}" for k, v in overrides.items()], f"--workdir={workdir}",
       f"--out={out}"],
      capture_output=True, text=True, timeout=300, check=False, cwd=str(tmp_path),
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"ONNX opset {export.MIN_ONNX_OPSET}, input clips float32 (B, {NUM_FRAMES}, 32, "
          f"32, 3), output logits (B, {config.model.num_classes})") in result.stdout, (
              result.stdout)
  reported = float(result.stdout.rsplit("max |difference| ", 1)[1].split()[0])

  clips = np.random.default_rng(1).normal(size=(3, NUM_FRAMES, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "clips.npy", clips)
  score = subprocess.run(
      [python, "-c", SCORE, str(out), str(tmp_path / "clips.npy"), str(tmp_path / "got.npy")],
      capture_output=True, text=True, timeout=120, check=False, cwd=str(tmp_path))
  assert score.returncode == 0, score.stderr[-3000:]
  assert score.stdout.split() == ["False", "False"]
  got = np.load(tmp_path / "got.npy")
  # The reference with the checkpoint's own kernels (on CPU: the XLA:CPU kernels the
  # export traces with, and the custom attention), and with the portable ones (flax's
  # max-pool, XLA's attention).
  for kernels in (config, export.portable(config)):
    apply = functools.partial(registry.build_model(kernels).apply, train=False)
    want = np.asarray(jax.jit(apply)(variables, clips))
    assert want.std() > 0.1  # a spread classifier: far from constant logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert reported <= 1e-4


def test_onnx_errors(tmp_path):
  config = synthetic_tsn.get_config()
  with pytest.raises(ValueError, match="onnx_opset must be at least 18, got 17"):
    export.run(config, str(tmp_path), str(tmp_path / "m.onnx"), export_format="onnx",
               onnx_opset=17)
  with pytest.raises(ValueError, match="format must be one of"):
    export.run(config, str(tmp_path), str(tmp_path / "m.onnx"), export_format="tflite")
  if importlib.util.find_spec("jax2onnx") is None:
    with pytest.raises(ImportError, match=r"pip install --no-deps jax2onnx==\S+ "):
      export.run(config, str(tmp_path), str(tmp_path / "m.onnx"), export_format="onnx")
  assert not os.path.exists(tmp_path / "m.onnx")


def test_logits_are_checked_against_the_spread_of_model_apply():
  """Rounding-sized differences pass; one logit off by 1% of the largest fails."""
  want = np.random.default_rng(0).normal(scale=20.0, size=(2, 10))
  assert export.check_logits(want * (1 + 1e-6), want) <= 1e-4 * np.abs(want).max()
  largest = np.abs(want).max()
  wrong = want.copy()
  wrong[1, 3] += 0.01 * largest
  with pytest.raises(export.OnnxMismatchError,
                     match=rf"by up to {0.01 * largest:.2e} \(tolerance "
                           rf"{1e-3 * largest + 1e-5:.2e}: "):
    export.check_logits(wrong, want)
  nan = want.copy()
  nan[0, 0] = np.nan
  with pytest.raises(export.OnnxMismatchError):
    export.check_logits(nan, want)


def test_a_mismatching_onnx_file_is_not_written(tmp_path, monkeypatch):
  """`run` checks the file's logits before it writes it (the conversion and the
  checkpoint stand-ins here: no ONNX environment needed)."""
  config = synthetic_tsn.get_config()
  want = np.random.default_rng(0).normal(size=(2, config.model.num_classes))
  monkeypatch.setattr(export, "_import_onnx_tools", lambda: (None, None))
  monkeypatch.setattr(checkpoint, "restore_variables", lambda *unused: ({}, 7))
  monkeypatch.setattr(export, "export_onnx", lambda *unused: b"onnx bytes")
  monkeypatch.setattr(export, "onnx_logits", lambda *unused: (want + 1, want))
  out = tmp_path / "m.onnx"
  with pytest.raises(export.OnnxMismatchError, match="nothing was written"):
    export.run(config, str(tmp_path), str(out), export_format="onnx")
  assert not out.exists()
  monkeypatch.setattr(export, "onnx_logits", lambda *unused: (want, want))
  export.run(config, str(tmp_path), str(out), export_format="onnx")
  assert out.read_bytes() == b"onnx bytes"
