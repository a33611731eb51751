"""The notebook's install logic (gta_jax/colab.py) on CPU, GPU and TPU runtimes."""

import importlib.metadata
import sys

import pytest

from gta_jax import colab

PACKAGE = "gta_jax @ git+https://github.com/owner/gta_jax"


@pytest.mark.parametrize("env,device_files,nvidia_smi,want", [
    # Colab CPU runtime (COLAB_GPU is set to 0 or '' there).
    ({"COLAB_GPU": "0"}, [], False, "cpu"),
    ({}, ["/dev/vfio/vfio"], False, "cpu"),  # the VFIO control file alone: no TPU
    # GPU runtimes: the driver's files, nvidia-smi, or Colab's variable.
    ({"COLAB_GPU": "1"}, ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"], True, "gpu"),
    ({}, ["/dev/nvidiactl"], False, "gpu"),
    ({}, [], True, "gpu"),
    ({"COLAB_GPU": "1"}, [], False, "gpu"),
    # Recent NVIDIA drivers also create /dev/accel*: the GPU wins.
    ({}, ["/dev/accel0", "/dev/nvidia0"], True, "gpu"),
    # TPU runtimes: a TPU VM's chips (v2-v4: accel, v5e/v6e: vfio) or its variables.
    ({}, ["/dev/accel0", "/dev/accel1", "/dev/accel2", "/dev/accel3"], False, "tpu"),
    ({}, ["/dev/vfio/vfio", "/dev/vfio/0"], False, "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-1"}, [], False, "tpu"),
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, [], False, "tpu"),
    ({"TPU_NAME": "local"}, [], False, "tpu"),
    ({"TPU_NAME": ""}, [], False, "cpu"),
])
def test_detect_runtime(env, device_files, nvidia_smi, want):
  assert colab.detect_runtime(env, device_files, nvidia_smi) == want


@pytest.mark.parametrize("runtime,extra", [
    ("cpu", []), ("gpu", ["jax[cuda12]"]), ("tpu", ["jax[tpu]"])])
def test_install_command_is_one_pip_call_with_the_runtimes_jax(runtime, extra):
  assert colab.install_command(runtime, PACKAGE, python="/usr/bin/python3") == [
      "/usr/bin/python3", "-m", "pip", "install", "-q", PACKAGE, *extra]


def test_install_command_defaults_to_this_interpreter_and_checks_the_runtime():
  assert colab.install_command("cpu", PACKAGE)[0] == sys.executable
  with pytest.raises(ValueError, match="runtime must be one of"):
    colab.install_command("cuda", PACKAGE)


@pytest.mark.parametrize("runtime,plugin", [("gpu", "jax-cuda12-plugin"),
                                            ("tpu", "libtpu")])
def test_the_jax_extra_pins_jaxlib_and_the_plugin(runtime, plugin):
  """In the JAX this project requires, `jax[cuda12]` and `jax[tpu]` pin jaxlib to jax's
  own version and name the plugin: pip resolves the three as one set."""
  extra = colab.JAX_EXTRAS[runtime].split("[")[1].rstrip("]")
  requires = [r for r in importlib.metadata.requires("jax") if f'extra == "{extra}"' in r]
  version = importlib.metadata.version("jax")
  assert any(r.startswith("jaxlib") and f"=={version}" in r.replace("<=", "==") for r in requires)
  assert any(r.startswith(plugin) for r in requires)


@pytest.mark.parametrize("runtime,backend,warned", [
    ("cpu", "cpu", False), ("gpu", "gpu", False), ("tpu", "tpu", False),
    ("gpu", "cpu", True), ("tpu", "cpu", True)])
def test_backend_warning(runtime, backend, warned):
  warning = colab.backend_warning(runtime, backend)
  assert bool(warning) == warned
  if warned:
    assert runtime.upper() in warning and colab.JAX_EXTRAS[runtime] in warning


def test_current_runtime_reads_the_device_files_and_the_path(monkeypatch):
  files = {"/dev/nvidia*": [], "/dev/accel*": ["/dev/accel0"], "/dev/vfio/*": []}
  monkeypatch.setattr(colab.glob, "glob", files.__getitem__)
  monkeypatch.setattr(colab.shutil, "which", lambda name: None)
  for name in (*colab.TPU_VARIABLES, "COLAB_GPU"):
    monkeypatch.delenv(name, raising=False)
  assert colab.current_runtime() == "tpu"
  files["/dev/accel*"] = []
  assert colab.current_runtime() == "cpu"
  monkeypatch.setattr(colab.shutil, "which",
                      {"nvidia-smi": "/usr/bin/nvidia-smi"}.get)
  assert colab.current_runtime() == "gpu"
