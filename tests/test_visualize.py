"""gta_jax.visualize: metrics rows, attention maps read from a checkpoint, PNG files."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax import visualize
from gta_jax.models import gta
from gta_jax.training import checkpoint

LAYERS = ("res3_block0/post/pixel_temporal", "res4_block2/post/region_temporal")
HEADS, T = 3, 4


def softmax_rows(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def planted_params(rng):
  """Params with a GTA `global_logits` at each of LAYERS, and a non-GTA layer."""
  params = {"head": {"fc": {"kernel": rng.normal(size=(8, 10)).astype(np.float32)}}}
  logits = {}
  for layer in LAYERS:
    node = params
    for part in layer.split("/"):
      node = node.setdefault(part, {})
    node["global_logits"] = logits[layer] = rng.normal(0, 2, (HEADS, T, T)).astype(np.float32)
  return params, logits


def write_metrics(workdir):
  rows = [{"kind": "train", "step": s, "loss": 3.0 - 0.1 * s, "accuracy": 0.05 * s,
           "lr": 0.1 / s} for s in (10, 20, 30)]
  rows += [{"kind": "eval", "step": 20, "split": "val", "top1": 0.3, "top5": 0.7, "loss": 2.0},
           # resumed from step 20: steps 30 and eval 20 logged again, the later rows win
           {"kind": "train", "step": 30, "loss": 0.5, "accuracy": 0.9, "lr": 0.01},
           {"kind": "eval", "step": 20, "split": "val", "top1": 0.4, "top5": 0.8, "loss": 1.9}]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.write('{"kind": "train", "st')  # killed mid-write


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with metrics and two checkpoints of planted GTA logits (step 1 is best)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  rng = np.random.default_rng(0)
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  logits = {}
  config = config_lib.synthetic_config("gta")
  config.model.gta.global_norm = "softmax"
  for step, top1 in ((1, 0.9), (2, 0.1)):
    params, logits[step] = planted_params(rng)
    ckpt.save(step, {"params": params}, None, config, metrics={"top1": top1})
  ckpt.wait()
  ckpt.close()
  write_metrics(workdir)
  return workdir, logits


def test_read_metrics_dedups_resumed_rows_and_skips_broken_lines(run):
  rows = visualize.read_metrics(os.path.join(run[0], "metrics.jsonl"))
  steps, loss = visualize.series(rows, "train", "loss")
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(loss, [2.0, 1.0, 0.5])
  steps, top1 = visualize.series(rows, "eval", "top1", "val")
  np.testing.assert_array_equal(steps, [20])
  np.testing.assert_allclose(top1, [0.4])
  assert visualize.series(rows, "eval", "top1", "test")[0].size == 0


@pytest.mark.parametrize("step,want", [("latest", 2), ("best", 1), (1, 1)])
def test_attention_maps_are_softmax_of_the_logits(run, step, want):
  workdir, logits = run
  maps, chosen = visualize.load_attention_maps(workdir, step)
  assert chosen == want
  assert sorted(maps) == sorted(LAYERS)
  for layer in LAYERS:
    np.testing.assert_allclose(maps[layer], softmax_rows(logits[want][layer]), rtol=1e-5)


def test_missing_checkpoint_is_a_clear_error(run, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 7 .*saved steps: \[1, 2\]"):
    visualize.load_attention_maps(run[0], 7)
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    visualize.load_attention_maps(str(tmp_path), "latest")


def test_attention_figure_shows_each_head(run):
  maps, _ = visualize.load_attention_maps(run[0])
  layer = LAYERS[0]
  fig = visualize.attention_figure(layer, maps[layer])
  shown = [ax.images[0].get_array() for ax in fig.axes if ax.images]
  assert len(shown) == HEADS
  for h in range(HEADS):
    np.testing.assert_allclose(np.asarray(shown[h]), maps[layer][h])


@pytest.mark.parametrize("global_norm", ["softmax-identity", "signed"])
def test_attention_maps_follow_the_runs_global_norm(tmp_path, global_norm):
  """The maps are the run's `A`: `softmax(G) - I` or `G` itself, read from the
  checkpoint's config."""
  params, logits = planted_params(np.random.default_rng(2))
  config = config_lib.synthetic_config("gta")
  config.model.gta.global_norm = global_norm
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {"params": params}, None, config)
  ckpt.close()
  maps, _ = visualize.load_attention_maps(str(tmp_path))
  for layer in LAYERS:
    want = (softmax_rows(logits[layer]) - np.eye(T) if global_norm == "softmax-identity"
            else logits[layer])
    np.testing.assert_allclose(maps[layer], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("global_norm", gta.GLOBAL_NORMS)
def test_attention_figure_for_every_global_norm(global_norm):
  """The maps of every `config.model.gta.global_norm` (rows summing to 1, to 0, or
  signed) are drawn head by head on the layer's own colour range."""
  logits = np.random.default_rng(1).normal(0, 2, (HEADS, T, T)).astype(np.float32)
  maps = gta.global_attention_maps({"params": {"layer": {"global_logits": logits}}},
                                   global_norm)["layer"]
  fig = visualize.attention_figure("layer", np.asarray(maps))
  shown = [ax.images[0] for ax in fig.axes if ax.images]
  assert len(shown) == HEADS
  for h, image in enumerate(shown):
    np.testing.assert_allclose(np.asarray(image.get_array()), maps[h])
    assert image.get_clim() == (float(maps.min()), float(maps.max()))


def test_save_run_figures_writes_pngs(run, tmp_path):
  notes = []
  paths = visualize.save_run_figures(run[0], str(tmp_path / "out"), log=notes.append)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted([visualize.CURVES_FILE,
                          "attention_res3_block0_post_pixel_temporal.png",
                          "attention_res4_block2_post_region_temporal.png"])
  for path in paths:
    image = cv2.imread(path)
    assert image is not None and min(image.shape[:2]) > 100, path
  assert not notes


def test_save_run_figures_without_checkpoint(run, tmp_path):
  workdir = tmp_path / "curves_only"
  workdir.mkdir()
  write_metrics(str(workdir))
  notes = []
  paths = visualize.save_run_figures(str(workdir), str(tmp_path / "out"), log=notes.append)
  assert [os.path.basename(p) for p in paths] == [visualize.CURVES_FILE]
  assert len(notes) == 1 and "no attention maps: no checkpoints in" in notes[0]


@pytest.mark.slow
def test_cli(run, tmp_path):
  out = tmp_path / "pngs"
  cmd = [sys.executable, "-m", "gta_jax.visualize", "--workdir", run[0], "--out", str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  printed = done.stdout.split()
  assert len(printed) == 3 and all(os.path.exists(p) for p in printed)
  empty = tmp_path / "empty"
  empty.mkdir()
  cmd[cmd.index("--workdir") + 1] = str(empty)
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 1 and "nothing to draw" in done.stderr


@pytest.fixture(scope="module")
def ssa_run(tiny_gta_run, tmp_path_factory):
  """A checkpoint of configs/synthetic_ssa.py at init (cosine logits times 10: M_T is
  not uniform), on tiny_gta_run's prepared dataset."""
  import synthetic_ssa  # pylint: disable=g-import-not-at-top
  from conftest import set_keys  # pylint: disable=g-import-not-at-top
  from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  config = set_keys(synthetic_ssa.get_config(), dict(tiny_gta_run["overrides"], seed=1))
  mesh = sharding.make_mesh()
  model, tx, _, _ = state_lib.build(config, mesh)
  state = state_lib.initial_state(config, model, tx, mesh)
  workdir = str(tmp_path_factory.mktemp("ssa_run"))
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(0, state, None, config)
  ckpt.wait()
  ckpt.close()
  return workdir, config


def reference_ssa_maps(config, workdir, clips):
  """Mean M_T of each SSA layer re-derived in numpy from the captured q_hat, k_hat:
  softmax over frames of (cosine of two frames' head slices) x the head's scale."""
  import jax  # pylint: disable=g-import-not-at-top
  from gta_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from gta_jax.models import build_model  # pylint: disable=g-import-not-at-top
  variables, _ = checkpoint.restore_variables(config, workdir)
  config = config.copy_and_resolve_references()
  config.eval.batch_size = clips
  video = next(iter(pipeline.make_eval_loader(
      config, "val", process_index=0, process_count=1)))["video"][:, 0]
  _, state = build_model(config).apply(variables, video, capture_intermediates=True,
                                       mutable=["intermediates"])
  heads = config.model.ssa.temporal_heads
  maps = {}
  for block, tree in state["intermediates"].items():
    if "inner" not in tree:
      continue
    qk = np.asarray(tree["inner"]["temporal_conv"]["__call__"][0], np.float64)
    b, t, h, w, c2 = qk.shape
    split = lambda a: a.reshape(b, t, h, w, heads, c2 // 2 // heads)
    unit = lambda a: a / np.sqrt(np.sum(a ** 2, axis=(2, 3, 5), keepdims=True))
    scale = np.exp(np.asarray(variables["params"][block]["inner"]["temporal_log_scale"]))
    logits = np.einsum("bthwnc,bshwnc->bnts", unit(split(qk[..., :c2 // 2])),
                       unit(split(qk[..., c2 // 2:]))) * scale[None, :, None, None]
    maps[f"{block}/inner"] = softmax_rows(logits).mean(0)
  return maps


def test_ssa_maps_are_the_mean_temporal_weights_of_val_clips(ssa_run):
  workdir, config = ssa_run
  maps, step, what = visualize.load_ssa_maps(workdir, clips=4)
  assert step == 0 and "mean of 4 val clips" in what and "softmax-identity" in what
  want = reference_ssa_maps(config, workdir, clips=4)
  assert sorted(maps) == sorted(want) == ["res4_block0/inner", "res5_block0/inner"]
  for layer, m in maps.items():
    assert m.shape == (config.model.ssa.temporal_heads, 4, 4)
    np.testing.assert_allclose(m, want[layer], rtol=1e-4, atol=1e-5)
    assert m.std() > 0.01  # the cosine scale at init makes M_T far from uniform


def test_ssa_maps_are_drawn_and_a_missing_dataset_is_named(ssa_run, tmp_path):
  workdir, _ = ssa_run
  notes = []
  written = visualize.save_run_figures(workdir, str(tmp_path / "out"), log=notes.append,
                                       clips=2)
  assert sorted(os.path.basename(p) for p in written) == [
      "attention_res4_block0_inner.png", "attention_res5_block0_inner.png"]
  assert all(cv2.imread(p) is not None for p in written)
  empty = tmp_path / "no_data"
  notes = []
  written = visualize.save_run_figures(workdir, str(tmp_path / "out2"), log=notes.append,
                                       data_dir=str(empty))
  assert not written
  assert any("no SSA attention maps" in n and str(empty) in n and "--data_dir" in n
             for n in notes), notes


def test_no_ssa_maps_for_a_run_without_ssa(tiny_gta_run):
  maps, step, _ = visualize.load_ssa_maps(tiny_gta_run["workdir"])
  assert maps == {} and step == 0
