"""gta_jax.export: the CLI's file, reloaded by a process that never imports gta_jax,
gives `model.apply`'s logits (the checkpoint's own kernels, not the portable ones the
export traces with) for another batch size than any traced here."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gta_jax import export
from gta_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELOAD = textwrap.dedent("""
    import sys
    import numpy as np
    from jax import export
    exported = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
    print(",".join(exported.platforms), "gta_jax" in sys.modules)
""")


@pytest.mark.slow
def test_exported_file_reloads_without_gta_jax(tiny_gta_run, tmp_path):
  config = tiny_gta_run["config"]
  out = tmp_path / "model.jaxexport"
  flags = [f"--config.{k}={v}" for k, v in tiny_gta_run["overrides"].items()]
  result = subprocess.run(
      [sys.executable, "-m", "gta_jax.export", "--config",
       os.path.join(REPO, "configs", "synthetic_gta.py"), *flags,
       "--workdir", tiny_gta_run["workdir"], f"--out={out}"],
      capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "platforms cpu,cuda,tpu" in result.stdout, result.stdout

  clips = np.random.default_rng(0).normal(size=(3, 4, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "clips.npy", clips)
  reload = subprocess.run(
      [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "clips.npy"),
       str(tmp_path / "logits.npy")],
      capture_output=True, text=True, timeout=300, check=False, cwd=str(tmp_path),
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=""))
  assert reload.returncode == 0, reload.stderr[-3000:]
  assert reload.stdout.split() == ["cpu,cuda,tpu", "False"]
  apply = jax.jit(functools.partial(registry.build_model(config).apply, train=False))
  want = np.asarray(apply(tiny_gta_run["variables"], clips))
  assert want.std() > 0.1  # a spread classifier: far from constant logits
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-4, rtol=1e-4)


def test_errors(tiny_gta_run, tmp_path):
  config = tiny_gta_run["config"]
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    export.run(config, str(tmp_path / "nowhere"), str(tmp_path / "m.jaxexport"))
  with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
    export.run(config, tiny_gta_run["workdir"], str(tmp_path / "m.jaxexport"), step=7)
  with pytest.raises(ValueError, match="platforms must be some of"):
    export.export_model(config, tiny_gta_run["variables"], ["gpu"])
  assert not os.path.exists(tmp_path / "m.jaxexport")
