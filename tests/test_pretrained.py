"""Tests of ImageNet weight import: the safe .pth reader, the name/layout mapping onto
the video ResNets, I3D inflation and the error messages. No PyTorch needed: the
state dicts are built here with torchvision's names and shapes (written out from
torchvision's ResNet constructor), and `.pth` files are written by a small pickle
writer below. `test_pretrained_torch.py` checks against PyTorch itself."""

import functools
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from gta_jax import config_lib
from gta_jax import pretrained
from gta_jax import torch_pickle
from gta_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False),
          50: ((3, 4, 6, 3), True), 101: ((3, 4, 23, 3), True)}


# -- state dicts with torchvision's names and shapes -------------------------------


def torchvision_shapes(layers, bottleneck, num_classes=1000, width=64, stem=7):
  """name -> shape of torchvision's `ResNet(block, layers)`.state_dict(), in order."""
  shapes = {}

  def bn(name, c):
    shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,),
                   f"{name}.running_mean": (c,), f"{name}.running_var": (c,),
                   f"{name}.num_batches_tracked": ()})

  expansion = 4 if bottleneck else 1
  shapes["conv1.weight"] = (width, 3, stem, stem)
  bn("bn1", width)
  inplanes = width
  for i, n in enumerate(layers):
    planes = width * 2**i
    for b in range(n):
      p = f"layer{i + 1}.{b}."
      if bottleneck:
        convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
      else:
        convs = [(planes, inplanes, 3), (planes, planes, 3)]
      for j, (cout, cin, k) in enumerate(convs):
        shapes[f"{p}conv{j + 1}.weight"] = (cout, cin, k, k)
        bn(f"{p}bn{j + 1}", cout)
      stride = 2 if i > 0 and b == 0 else 1
      if stride != 1 or inplanes != planes * expansion:
        shapes[f"{p}downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
        bn(f"{p}downsample.1", planes * expansion)
      inplanes = planes * expansion
  shapes["fc.weight"] = (num_classes, inplanes)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def random_state_dict(shapes, seed=0):
  """Random values; BN variances positive, step counters int64."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    if name.endswith("num_batches_tracked"):
      out[name] = np.array(100, np.int64)
    elif name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight",
                        "downsample.1.weight")):
      out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      scale = 0.1 if len(shape) == 1 else np.sqrt(2 / np.prod(shape[1:]))
      out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
  return out


def zeros_state_dict(shapes):
  """Free to build: zero-stride views (for tests of errors)."""
  return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def expected_flax(name, value, kt=None):
  """Where a torchvision tensor must land and how it must look (this test's own rule)."""
  parts = name.split(".")
  leaf = parts[-1]
  if parts[0] == "conv1":
    module = ("stem_conv", "conv")
  elif parts[0] == "bn1":
    module = ("stem_bn",)
  elif parts[0] == "fc":
    module = ("head", "fc")
  else:
    block = f"res{int(parts[0][len('layer'):]) + 1}_block{parts[1]}"
    sub = ".".join(parts[2:-1])
    module = {"downsample.0": ("downsample_conv", "conv"),
              "downsample.1": ("downsample_bn",)}.get(sub)
    if module is None:
      module = (sub, "conv") if sub.startswith("conv") else (sub,)
    module = (block,) + module
  is_conv = module[-1] == "conv"
  collection, leaf = {"weight": ("params", "kernel" if is_conv or module[-1] == "fc"
                                 else "scale"),
                      "bias": ("params", "bias"),
                      "running_mean": ("batch_stats", "mean"),
                      "running_var": ("batch_stats", "var")}[leaf]
  if is_conv:
    value = np.einsum("oihw->hwio", value)
    if kt is not None:
      value = np.stack([value / kt] * kt)
  elif module[-1] == "fc" and leaf == "kernel":
    value = np.einsum("oi->io", value)
  return (collection,) + module + (leaf,), value


# -- a .pth writer (torch.save's zip layout, pickle opcodes written by hand) --------

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
            np.dtype(np.int64): "LongStorage"}


def _str(s):
  data = s.encode()
  return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _ints(values):
  return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def write_pth(path, tensors, storages=None, legacy=False):
  """Writes a state dict as torch.save does (protocol 2 pickle + raw storages).

  Args:
    path: the file.
    tensors: name -> array, or name -> (storage key, offset, shape, strides) views
      of `storages` (strides in elements).
    storages: key -> 1-D array.
    legacy: PyTorch < 1.6's format (one stream) instead of the zip archive.
  """
  storages = dict(storages or {})
  pkl = [b"\x80\x02", b"ccollections\nOrderedDict\n)R"]
  for name, value in tensors.items():
    if isinstance(value, np.ndarray):
      key, value = str(len(storages)), np.array(value, order="C")
      storages[key] = value.reshape(-1)
      value = (key, 0, value.shape, tuple(s // value.itemsize for s in value.strides))
    key, offset, shape, strides = value
    storage = storages[key]
    pid = (b"(" + _str("storage") + f"ctorch\n{_STORAGE[storage.dtype]}\n".encode()
           + _str(key) + _str("cpu") + b"J" + struct.pack("<i", storage.size)
           + (b"N" if legacy else b"") + b"tQ")
    pkl += [_str(name), b"ctorch._utils\n_rebuild_tensor_v2\n(", pid,
            b"J" + struct.pack("<i", offset), _ints(shape), _ints(strides),
            b"\x89ccollections\nOrderedDict\n)RtR", b"s"]
  pkl.append(b".")
  if legacy:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        f.write(pickle.dumps(header, protocol=2))
      f.write(b"".join(pkl))
      f.write(pickle.dumps(sorted(storages), protocol=2))
      for key in sorted(storages):
        f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())
    return
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"".join(pkl))
    archive.writestr("archive/byteorder", "little")
    for key, storage in storages.items():
      archive.writestr(f"archive/data/{key}", storage.tobytes())


def write_state_dict(path, state_dict):
  path = str(path)
  if path.endswith(".npz"):
    np.savez(path, **state_dict)
  elif path.endswith(".safetensors"):
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                                path)
  else:
    write_pth(path, state_dict)
  return path


def model_config(depth=50, arch="resnet2d", num_classes=1000, temporal_modules="",
                 num_frames=2, **model):
  config = config_lib.base_config()
  config.data.num_frames = num_frames
  config.model.update(dict(arch=arch, depth=depth, num_classes=num_classes,
                           temporal_modules=temporal_modules, **model))
  return config


def abstract_variables(config, size=64):
  model = build_model(config)
  video = jnp.zeros((1, config.data.num_frames, size, size, 3))
  return jax.eval_shape(functools.partial(model.init, train=False),
                        jax.random.key(0), video)


def flat(tree):
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- the .pth reader ---------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_reader_reads_views_dtypes_and_shared_storage(tmp_path, legacy):
  base = np.arange(24, dtype=np.float32)
  tensors = {
      "a": ("s", 0, (4, 6), (6, 1)),
      "a_t": ("s", 0, (6, 4), (1, 6)),  # transposed view of the same storage
      "tail": ("s", 8, (2, 3), (6, 2)),  # offset and a step
      "half": np.linspace(-1, 1, 5).astype(np.float16),
      "count": np.array(7, np.int64),
  }
  path = tmp_path / "views.pth"
  write_pth(path, tensors, {"s": base}, legacy=legacy)
  loaded = torch_pickle.load(path)
  grid = base.reshape(4, 6)
  np.testing.assert_array_equal(loaded["a"], grid)
  np.testing.assert_array_equal(loaded["a_t"], grid.T)
  np.testing.assert_array_equal(loaded["tail"], [[8, 10, 12], [14, 16, 18]])
  assert loaded["half"].dtype == np.float16
  np.testing.assert_array_equal(loaded["half"], tensors["half"])
  assert loaded["count"].shape == () and loaded["count"] == 7
  assert list(loaded) == list(tensors)


class _RunsCommand:
  """Pickles to `os.system(command)`: what a malicious checkpoint does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _planted_pth(path, payload):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))


def test_pth_reader_refuses_a_pickle_that_runs_a_command(tmp_path):
  marker = tmp_path / "pwned"
  payload = {"conv1.weight": _RunsCommand(f"touch {marker}")}
  # The planted pickle does run the command under a plain pickle.load ...
  pickle.loads(pickle.dumps(payload, protocol=2))
  assert marker.exists()
  marker.unlink()
  # ... and the reader refuses it by name before anything runs.
  path = tmp_path / "planted.pth"
  _planted_pth(path, payload)
  global_name = f"{os.system.__module__}.system"
  with pytest.raises(torch_pickle.UnsafePickleError, match=global_name):
    torch_pickle.load(path)
  legacy = tmp_path / "planted_legacy.pth"  # the same in the pre-zip format
  legacy.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in (
      0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, payload)))
  with pytest.raises(torch_pickle.UnsafePickleError, match=global_name):
    torch_pickle.load(legacy)
  with pytest.raises(torch_pickle.UnsafePickleError, match="refusing"):
    pretrained.load_state_dict(path)
  assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {"x": functools.partial(print, "hi")},  # any non-allowed class
    {"x": eval},  # a builtin as a value
])
def test_pth_reader_refuses_other_globals(tmp_path, payload):
  path = tmp_path / "other.pth"
  _planted_pth(path, payload)
  with pytest.raises(torch_pickle.UnsafePickleError, match="refusing to load global"):
    torch_pickle.load(path)


def test_pth_reader_checks_views_and_records(tmp_path):
  path = tmp_path / "bad.pth"
  write_pth(path, {"w": ("s", 20, (2, 3), (3, 1))}, {"s": np.zeros(24, np.float32)})
  with pytest.raises(pickle.UnpicklingError, match="runs past its storage"):
    torch_pickle.load(path)
  with zipfile.ZipFile(path) as archive:
    pkl = archive.read("archive/data.pkl")
  with zipfile.ZipFile(path, "w") as archive:  # the storage record is gone
    archive.writestr("archive/data.pkl", pkl)
  with pytest.raises(ValueError, match="archive/data/s.*missing"):
    torch_pickle.load(path)
  (tmp_path / "old.pth").write_bytes(pickle.dumps({"w": 1}, protocol=2))
  with zipfile.ZipFile(path, "w") as archive:  # BUILD on an allowed global
    archive.writestr("archive/data.pkl", b"\x80\x02ctorch\nFloatStorage\n}"
                     + _str("dtype") + _str("O") + b"sb.")
  with pytest.raises(pickle.UnpicklingError, match="refusing to set the state"):
    torch_pickle.load(path)
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    torch_pickle.load(tmp_path / "old.pth")
  write_pth(tmp_path / "legacy.pth", {"w": np.zeros(6, np.float32)}, legacy=True)
  data = (tmp_path / "legacy.pth").read_bytes()
  (tmp_path / "short.pth").write_bytes(data[:-8])  # the storage is cut short
  with pytest.raises(ValueError, match="fewer than 6 x float32"):
    torch_pickle.load(tmp_path / "short.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_load_state_dict_formats(tmp_path, suffix):
  shapes = torchvision_shapes((1, 1, 1, 1), True, num_classes=5, width=8, stem=3)
  state = random_state_dict(shapes)
  loaded = pretrained.load_state_dict(write_state_dict(tmp_path / f"w{suffix}", state))
  assert sorted(loaded) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  # DataParallel's 'module.' prefix is dropped.
  wrapped = write_state_dict(tmp_path / f"dp{suffix}",
                             {f"module.{k}": v for k, v in state.items()})
  assert sorted(pretrained.load_state_dict(wrapped)) == sorted(state)


# -- the mapping -------------------------------------------------------------------


@pytest.mark.parametrize("depth,suffix", [(18, ".pth"), (50, ".safetensors")])
def test_mapping_of_torchvision_names(tmp_path, depth, suffix):
  state = random_state_dict(torchvision_shapes(*LAYERS[depth]))
  path = write_state_dict(tmp_path / f"r{depth}{suffix}", state)
  config = model_config(depth)
  loaded = flat(pretrained.load_pretrained(abstract_variables(config), path, config))
  expected = {}
  for name, value in state.items():
    if not name.endswith("num_batches_tracked"):
      target, value = expected_flax(name, value)
      expected[target] = value
  assert sorted(expected) == sorted(loaded)  # every variable, nothing else
  for target, value in expected.items():
    assert loaded[target].dtype == jnp.float32
    np.testing.assert_array_equal(loaded[target], value, err_msg="/".join(target))


def test_class_count_mismatch_keeps_the_fresh_head():
  state = random_state_dict(torchvision_shapes(*LAYERS[18], num_classes=1000))
  config = model_config(18, num_classes=174)
  variables = abstract_variables(config)
  fresh = flat(variables)
  plan = pretrained.plan_load(variables, state)
  loaded = flat(pretrained.apply_plan(variables, plan))
  for path in [("params", "head", "fc", "kernel"), ("params", "head", "fc", "bias")]:
    assert loaded[path] is fresh[path]
    assert (path, "the file's classifier has 1000 classes, the model 174") in plan.kept
  assert {name for name, _ in plan.ignored if name.startswith("fc.")} == {
      "fc.weight", "fc.bias"}
  assert len(plan.loaded) == len(fresh) - 2


def test_temporal_modules_keep_their_init_and_are_listed():
  state = zeros_state_dict(torchvision_shapes(*LAYERS[50]))
  config = model_config(50, temporal_modules="nl", num_frames=4)
  config.model.nl.placement = "res3:0;res4:1"
  plan = pretrained.plan_load(abstract_variables(config), state)
  kept_modules = {path[1:3] for path, _ in plan.kept}
  assert kept_modules == {("res3_block0", "post"), ("res4_block1", "post")}
  assert len(plan.loaded) == sum(not k.endswith("num_batches_tracked") for k in state)
  text = "\n".join(pretrained.summary(plan, "r50.pth"))
  assert "res3_block0/post" in text and "res4_block1/post" in text


@pytest.mark.parametrize("file_depth,model_depth,message", [
    (18, 50, r"layer1\.0\.conv3\.weight is missing \(for res2_block0/conv3/conv\)"),
    (50, 18, r"layer1\.0\.conv1\.weight has shape \(64, 64, 1, 1\).*params/res2_block0/"
             r"conv1/conv/kernel needs \(3, 3, 64, 64\)"),
    (101, 50, r"layer3\.6\.conv1\.weight \(256, 1024, 1, 1\) is in the file but not in "
              r"the model"),
])
def test_another_architecture_is_an_error_naming_the_parameter(
    file_depth, model_depth, message):
  state = zeros_state_dict(torchvision_shapes(*LAYERS[file_depth]))
  config = model_config(model_depth)
  with pytest.raises(ValueError, match=f"ResNet-{file_depth}"):
    pretrained.plan_load(abstract_variables(config), state)
  with pytest.raises(ValueError, match=message):
    pretrained.plan_load(abstract_variables(config), state)


def test_shape_mismatch_and_foreign_files_are_errors():
  shapes = torchvision_shapes(*LAYERS[18])
  shapes["layer2.1.conv2.weight"] = (128, 128, 5, 5)
  variables = abstract_variables(model_config(18))
  with pytest.raises(ValueError, match=r"layer2\.1\.conv2\.weight has shape \(128, 128, "
                     r"5, 5\).*params/res3_block1/conv2/conv/kernel needs"):
    pretrained.plan_load(variables, zeros_state_dict(shapes))
  vit = {"patch_embed.proj.weight": np.zeros((768, 3, 16, 16), np.float32)}
  with pytest.raises(ValueError, match=r"file: not a torchvision/timm-style ResNet(.|\n)*"
                     r"conv1\.weight is missing"):
    pretrained.plan_load(variables, vit)
  with pytest.raises(ValueError, match="unknown file type"):
    pretrained.load_state_dict(__file__)


# -- I3D inflation -----------------------------------------------------------------


@pytest.mark.parametrize("inflation", ["mean", "center"])
def test_inflation_of_a_3d_resnet50(inflation):
  state = random_state_dict(torchvision_shapes(*LAYERS[50]))
  config = model_config(50, arch="resnet3d", num_frames=8,
                        resnet3d=dict(inflate="res4:all;res5:0", stem_temporal_kernel=5,
                                      stem_temporal_stride=1),
                        pretrained_inflation=inflation)
  loaded = pretrained.plan_load(abstract_variables(config), state,
                                inflation=inflation).arrays
  checked = 0
  for name, value in state.items():
    if name.endswith("num_batches_tracked"):
      continue
    target = expected_flax(name, value)[0]
    kt = loaded[target].shape[0] if loaded[target].ndim == 5 else None
    if kt is None:
      continue
    kernel = np.einsum("oihw->hwio", value)
    if inflation == "mean":
      want = np.stack([kernel / kt] * kt)
    else:
      want = np.zeros((kt,) + kernel.shape, np.float32)
      want[kt // 2] = kernel
    np.testing.assert_allclose(loaded[target], want, rtol=1e-6, err_msg=name)
    checked += 1
  # The stem (kt=5), res4's six first convs and res5 block 0's (kt=3).
  assert checked == 1 + 6 + 1


STATIC_T = 16


@functools.lru_cache(maxsize=None)
def _tiny(arch, inflation="mean"):
  """A tiny ResNet-50 (2D, or 3D with an I3D stem of kt=5 and inflated res4/res5)
  loaded from one random 2D state dict, and its logits and res5 features on a
  static clip of 16 frames."""
  state = random_state_dict(torchvision_shapes((1, 1, 1, 1), True, num_classes=5,
                                               width=8, stem=3), seed=3)
  config = model_config(arch=arch, depth=50, num_classes=5, num_frames=STATIC_T,
                        stage_sizes="1,1,1,1", width=8, small_stem=True)
  config.model.resnet3d.stem_temporal_kernel = 5
  variables = abstract_variables(config, 32)
  plan = pretrained.plan_load(variables, state, inflation=inflation)
  assert not plan.kept  # every variable from the file
  frame = jax.random.normal(jax.random.key(0), (2, 1, 32, 32, 3))
  clip = jnp.repeat(frame, STATIC_T, axis=1)
  return _features_and_logits(build_model(config), pretrained.apply_plan(variables, plan),
                              clip)


@functools.partial(jax.jit, static_argnums=0)
def _features_and_logits(model, variables, clip):
  """Logits and res5's per-frame output (eval mode: BN uses the file's statistics)."""
  logits, state = model.apply(variables, clip, train=False, capture_intermediates=(
      lambda module, _: module.name == "res5_block0"))
  return logits, state["intermediates"]["res5_block0"]["__call__"][0]


def test_center_inflation_on_a_static_clip_equals_the_2d_model():
  l2, _ = _tiny("resnet2d")
  l3, _ = _tiny("resnet3d", "center")
  # Only the centre tap is non-zero, so every frame sees exactly the 2D conv:
  # equal up to float32 summation order.
  np.testing.assert_allclose(l3, l2, rtol=1e-5, atol=1e-5 * np.abs(l2).max())


def test_mean_inflation_on_a_static_clip_is_close_to_the_2d_model():
  t = STATIC_T
  l2, f2 = _tiny("resnet2d")
  l3, f3 = _tiny("resnet3d", "mean")
  # With W/kt repeated kt times a static clip gives sum_k W/kt x = W x: exact, except
  # where the temporal window runs over the zero padding at the clip ends. The stem
  # (kt=5) reaches 2 frames in, res4's and res5's convs (kt=3) one frame more each:
  # frames 4..11 of 16 are exact (up to float32 rounding) ...
  edge = 2 + 1 + 1
  scale = np.abs(f2).max()
  np.testing.assert_allclose(f3[:, edge:t - edge], f2[:, edge:t - edge], rtol=1e-5,
                             atol=1e-5 * scale)
  assert np.abs(f3[:, 0] - f2[:, 0]).max() > 1e-3 * scale  # the ends do differ
  # ... and since the head is linear, logits3 - logits2 = fc(sum over the 8 boundary
  # frames of their feature differences) / 16. A boundary frame loses up to 2/5 of
  # the stem's input and 1/3 of each inflated conv's; the differences shrink inward
  # (here about 0.55, 0.26, 0.09, 0.02 of the feature scale at frames 0..3, so the
  # logits differ by about 2 x 0.92 / 16 = 12%). Tolerance: 25% of the largest logit,
  # the bound for 8 of 16 frames each off by at most half the feature scale; it
  # shrinks as 1/T. (In training mode BN's batch statistics would mix the ends into
  # every frame; eval mode normalises with the file's running statistics.)
  np.testing.assert_allclose(l3, l2, atol=0.25 * np.abs(l2).max())
  assert not np.allclose(l3, l2, atol=1e-5 * np.abs(l2).max())


# -- the inspect CLI ---------------------------------------------------------------


def test_inspect_lists_what_loads_and_what_is_kept(tmp_path):
  state = random_state_dict(torchvision_shapes(*LAYERS[18]))
  path = write_state_dict(tmp_path / "r18.npz", state)
  config = model_config(18, num_classes=10, temporal_modules="nl", num_frames=4)
  config.model.nl.placement = "res4:1"
  config.data.crop_size = 64
  lines = pretrained.inspect(path, config)
  text = "\n".join(lines)
  assert "ResNet-18 (basic blocks 2,2,2,2" in lines[0]
  assert ("layer3.1.conv2.weight (256, 256, 3, 3) -> params/res4_block1/conv2/conv/kernel "
          "(3, 3, 256, 256)") in text
  assert "kept: res4_block1/post" in text
  assert "kept: head/fc (2 arrays): the file's classifier has 1000 classes, the model 10" in text


@pytest.mark.slow
def test_inspect_cli(tmp_path):
  state = random_state_dict(torchvision_shapes((1, 1, 1, 1), True, num_classes=5,
                                               width=8, stem=3))
  path = write_state_dict(tmp_path / "tiny.pth", state)
  result = subprocess.run(
      [sys.executable, "-m", "gta_jax.pretrained", "inspect", path], cwd=REPO,
      capture_output=True, text=True, timeout=120, check=True)
  num_bn = sum(name.endswith("num_batches_tracked") for name in state)
  assert f"loaded {len(state) - num_bn} arrays from" in result.stdout
  assert "layer1.0.downsample.0.weight (32, 8, 1, 1) -> params/res2_block0/" in result.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "gta_jax.pretrained", "inspect", path, "--config",
       os.path.join(REPO, "configs", "synthetic_tsn.py"), "--config.model.width=16"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  assert "conv1.weight has shape (8, 3, 3, 3)" in bad.stderr
