"""benchmarks/ablations.py's bookkeeping (with benchmarks/run_cache.py's) and
benchmarks/real_videos.py's folder and benchmarks/ssa_temporal.py's report."""

import functools
import json
import os
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import ablations  # pylint: disable=g-import-not-at-top,wrong-import-position
import real_videos  # pylint: disable=g-import-not-at-top,wrong-import-position
import run_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
import ssa_temporal  # pylint: disable=g-import-not-at-top,wrong-import-position

from gta_jax.data import video_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from gta_jax.models import build_model  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("real_videos"))
  real_videos.make_folder(out, train_per_class=2, val_per_class=1)
  return out


def _mean_shift(frames):
  """Mean (dx, dy) of the content between consecutive frames (phase correlation)."""
  gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float64) for f in frames]
  shifts = [cv2.phaseCorrelate(a, b)[0] for a, b in zip(gray[:-1], gray[1:])]
  return np.mean(shifts, axis=0)


def test_real_videos_decode_and_move_the_way_their_class_says(real_folder):
  for split, count in (("train", 2), ("val", 1)):
    assert sorted(os.listdir(os.path.join(real_folder, split))) == sorted(
        real_videos.CLASS_NAMES)
    for name in real_videos.CLASS_NAMES:
      files = sorted(os.listdir(os.path.join(real_folder, split, name)))
      assert len(files) == count and all(f.endswith(".mp4") for f in files)
  clips = {name: [video_io.read_video(os.path.join(real_folder, "train", name, f"{i:04d}.mp4"))
                  for i in range(2)] for name in real_videos.CLASS_NAMES}
  assert all(len(v) == 24 and v[0].shape == (72, 96, 3) for c in clips.values() for v in c)
  for clip in clips["moves_right"]:
    assert _mean_shift(clip)[0] > 0.3
  for clip in clips["moves_left"]:
    assert _mean_shift(clip)[0] < -0.3
  for clip in clips["moves_down"]:
    assert _mean_shift(clip)[1] > 0.3
  for clip in clips["moves_up"]:
    assert _mean_shift(clip)[1] < -0.3
  for name, sign in (("brightens", 1), ("darkens", -1)):
    for clip in clips[name]:
      assert sign * (clip[-1].mean() - clip[0].mean()) > 20


def test_real_videos_keep_existing_files(real_folder):
  path = os.path.join(real_folder, "val", "grows", "0000.mp4")
  before = os.path.getmtime(path)
  real_videos.make_folder(real_folder, train_per_class=2, val_per_class=1)
  assert os.path.getmtime(path) == before


def test_commands_put_the_real_folder_in_place_of_the_placeholder():
  train, evaluate = ablations.commands("real_gta", 3, "/w", "/d", "/videos")
  assert train[:2] == ["python", "train.py"] and evaluate[1] == "eval.py"
  assert train[2:] == evaluate[2:]
  assert "--config.data.manual_dir=/videos" in train
  assert "--config.data.dataset=video_folder" in train
  assert "--config.seed=3" in train and "--config.data.data_dir=/d" in train
  assert ablations.pairs_of("real_gta") == real_videos.PAIRS
  assert ablations.pairs_of("gta") != real_videos.PAIRS


def test_pair_accuracy_counts_each_pair_of_classes(tmp_path):
  csv = tmp_path / "p.csv"
  rows = [("a", "moves_right", "moves_right"), ("b", "moves_left", "moves_right"),
          ("c", "grows", "grows"), ("d", "shrinks", "shrinks"),
          ("e", "brightens", "darkens")]
  csv.write_text("video,label,prediction,score\n"
                 + "".join(f"{v},{l},{p},0.5\n" for v, l, p in rows))
  got = ablations.pair_accuracy(str(csv), real_videos.PAIRS)
  assert got["moves_right/moves_left"] == 0.5
  assert got["grows/shrinks"] == 1.0
  assert got["brightens/darkens"] == 0.0
  assert np.isnan(got["moves_down/moves_up"])  # no videos of that pair


def _recipe(row):
  return run_cache.recipe(*ablations.ROWS[row][:2])


def _run(row, seed, top1):
  return dict(row=row, seed=seed, top1=top1, overrides=list(ablations.ROWS[row][1]),
              per_pair={str(i): top1 for i in range(5)}, train_seconds=1.0,
              commands=["python train.py", "python eval.py"], date="today",
              recipe=_recipe(row))


@pytest.mark.parametrize("having, without, word", [
    ((0.9, 0.92), (0.5, 0.6), "**supported**"),
    ((0.9, 0.92), (0.5, 0.91), "**inconclusive**"),
    ((0.9, 0.92), (0.95, 0.91), "**not supported**"),
])
def test_verdict_compares_every_seed(having, without, word):
  runs = {"gta": [_run("gta", s, t) for s, t in enumerate(having)],
          "gta_instance": [_run("gta_instance", s, t) for s, t in enumerate(without)]}
  assert ablations._verdict(runs, "gta", ("gta_instance",)).startswith(word)
  assert ablations._verdict({}, "gta", ("gta_instance",)).startswith("not measured")
  # On chosen pairs instead of top-1: the second pair decides.
  for row, pair in (("gta", (1.0, 0.9)), ("gta_instance", (0.0, 0.5))):
    for r in runs[row]:
      r["per_pair"] = {"a/b": pair[0], "c/d": pair[1] + 0.01 * r["seed"]}
  got = ablations._verdict(runs, "gta", ("gta_instance",), ("c/d",))
  assert got == ("**supported**: mean pair accuracy `gta` 0.905, `gta_instance` 0.505")


def test_stale_runs_are_left_out_of_the_table(tmp_path):
  fresh, stale = _run("gta_pixel", 0, 0.9), _run("gta_region", 0, 0.4)
  stale["overrides"] = ["model.gta.granularity=pixel"]  # not the row's definition
  for run in (fresh, stale):
    (tmp_path / f"{run['row']}_seed0.json").write_text(json.dumps(run))
  runs = run_cache.load_runs(str(tmp_path), ablations.ROWS)
  assert list(runs) == ["gta_pixel"]
  doc = ablations.render(runs)
  assert "| `gta_pixel` |" in doc and "| `gta_region` |" not in doc
  assert "**0.900**" in doc


def test_recipe_applies_the_overrides_with_their_types():
  gta, instance = _recipe("gta"), _recipe("gta_instance")
  assert gta["model.temporal_modules"] == "gta"
  assert instance["model.gta.temporal_attention"] == "instance"
  assert {k for k in gta if gta[k] != instance[k]} == {"model.gta.temporal_attention"}
  assert "seed" not in gta and "data.data_dir" not in gta
  tsn, nl3d = _recipe("tsn"), _recipe("nl3d")
  assert not any(k.startswith("model.gta.") for k in tsn)  # a module it does not use
  assert not any(k.startswith("model.gta.") for k in nl3d)
  assert nl3d["model.nl.kind"] == "3d"
  assert _recipe("gta_res4_res5")["model.gta.placement"] == "res4:0;res5:0"
  assert _recipe("gta_gate0")["model.gta.gate_init"] == 0.0
  assert _recipe("gta_region_norm")["model.gta.region_norm"] is True
  assert _recipe("ssa_one_head")["model.ssa.temporal_heads"] == 1


def test_runs_of_an_older_recipe_are_stale(tmp_path):
  """A changed value retires a run; a key the run's recipe lacks does not."""
  older, newer_key, current = (_run("gta", s, 0.5 + 0.1 * s) for s in range(3))
  older["recipe"]["model.gta.cross_channel"] = True  # the recipe before grouped heads
  del newer_key["recipe"]["model.gta.pool_keys"]  # a run older than the key
  for run in (older, newer_key, current):
    (tmp_path / f"gta_seed{run['seed']}.json").write_text(json.dumps(run))
  assert run_cache.changed_keys(older, _recipe("gta")) == [
      "model.gta.cross_channel"]
  runs = run_cache.load_runs(str(tmp_path), ablations.ROWS)
  assert sorted(r["seed"] for r in runs["gta"]) == [1, 2]


def test_a_run_older_than_a_listed_key_ran_with_its_old_value():
  """A run recorded before a key of run_cache.UNRECORDED_KEYS existed counts as
  having its listed value: current while the recipe keeps it, stale when not."""
  key = "model.ssa.temporal_cosine_scale"
  assert run_cache.UNRECORDED_KEYS[key] == 0.0
  run = _run("ssa", 0, 0.9)
  older = dict(_recipe("ssa"), **{key: 0.0})  # the recipe before cosine logits
  del run["recipe"][key]
  assert run_cache.changed_keys(run, older) == []
  assert run_cache.changed_keys(run, dict(older, **{key: 10.0})) == [key]
  assert run_cache.changed_keys(run, dict(older, **{"model.ssa.new_key": 1})) == []


def test_readme_block_is_replaced_and_the_rest_kept():
  runs = {"gta": [_run("gta", 1, 0.9), _run("gta", 0, 0.8)],
          "gta_pixel": [_run("gta_pixel", 0, 0.7)]}  # not a README row
  summary = ablations.render_summary(runs)
  assert "| `gta` |" in summary and "**0.850** | 0.800-0.900 | 0, 1 |" in summary
  assert "gta_pixel" not in summary
  text = (f"intro\n{ablations.README_BEGIN}\nold table\n{ablations.README_END}\nrest\n")
  markers = (ablations.README_BEGIN, ablations.README_END)
  got = run_cache.replace_block(text, summary, *markers)
  assert got == f"intro\n{ablations.README_BEGIN}\n{summary}{ablations.README_END}\nrest\n"
  assert run_cache.replace_block(got, summary, *markers) == got
  with pytest.raises(ValueError, match="begin"):
    run_cache.replace_block("no markers", summary, *markers)


def test_long_rows_are_the_rows_on_the_second_task():
  assert ablations.ROWS["long_gta"][0] == "synthetic_long_gta"
  assert ablations.ROWS["long_nl3d_position"][1] == ablations.ROWS["nl3d_position"][1]
  assert _recipe("long_gta")["data.dataset"] == "synthetic_long"
  assert _recipe("long_nl3d_position")["model.nl.temporal_position"] == "learned"
  assert ablations.pairs_of("long_tsn") == ablations.synthetic_long.PAIRS
  assert ablations.pairs_of("tsn") == ablations.synthetic_motion.PAIRS


def test_the_page_keeps_its_design_and_lists_what_is_not_run():
  design = f"{ablations.DESIGN_BEGIN}\n## Design\ntext\n{ablations.DESIGN_END}\n"
  page = ablations.render({}, design)
  assert ablations.design_block(f"before\n{page}after") == design
  assert ablations.design_block("no design") == ""
  runs = {"long_gta": [_run("long_gta", 0, 0.9)]}
  page = ablations.render(runs, design)
  assert "## Rows on `synthetic_long`" in page and "| `long_gta` |" in page
  assert ("- `long_gta`, seed 1: `python benchmarks/ablations.py --rows=long_gta "
          "--seeds=1`") in page
  assert "- `long_tsn`, seeds 0,1:" in page and "- `gta`, seeds 0,1:" in page
  # A single switch with one seed is asked for its second; an earlier recipe's row
  # is not, nor is a row without any run.
  runs = {row: [_run(row, 0, 0.9)] for row in ("gta_gate0", "xc_gta_pixel")}
  page = ablations.render(runs, design)
  assert "- `gta_gate0`, seed 1: `python benchmarks/ablations.py --rows=gta_gate0" in page
  assert "`xc_gta_pixel`, seed" not in page and "`gta_softmax`, seed" not in page


def test_a_numerics_only_key_does_not_retire_a_run():
  run = _run("gta", 0, 0.9)
  run["recipe"]["model.bn_two_pass_variance"] = True
  assert run_cache.changed_keys(run, _recipe("gta")) == []
  run["recipe"]["model.gta.cross_channel"] = True
  assert run_cache.changed_keys(run, _recipe("gta")) == ["model.gta.cross_channel"]


def test_a_run_of_another_builder_version_is_stale():
  """A run records its dataset builder's version; one recorded before runs did so
  counts as built at run_cache.UNRECORDED_VERSIONS' version."""
  key = run_cache.VERSION_KEY
  current = _recipe("long_gta")
  assert current[key] == str(ablations.synthetic_long.SyntheticLong.VERSION)
  run = _run("long_gta", 0, 0.9)
  assert run_cache.changed_keys(run, current) == []
  del run["recipe"][key]  # recorded before versions were: synthetic_long 1.0.0
  assert run_cache.changed_keys(run, dict(current, **{key: "1.0.0"})) == []
  assert run_cache.changed_keys(run, dict(current, **{key: "1.1.0"})) == [key]
  run = _run("gta", 0, 0.9)
  del run["recipe"][key]  # synthetic_motion, still at the version runs began with
  assert run_cache.changed_keys(run, _recipe("gta")) == []


@pytest.mark.parametrize("overrides, saturated", [
    (("model.ssa.temporal_cosine_scale=0.0", "model.ssa.scale=none"), True),
    ((), False),  # the recipe: cosines times 10
])
def test_ssa_temporal_sees_saturated_dot_products(overrides, saturated):
  """benchmarks/ssa_temporal.py at init: the paper's unscaled dot products give
  one-hot rows of M_T (docs/ssa.md); the recipe's cosine logits stay within their
  scale, 10, and do not."""
  config = run_cache.load_config("synthetic_ssa", overrides)
  model = build_model(config)
  video = jax.random.randint(jax.random.key(0), (2, 8, 32, 32, 3), 0, 256).astype(jnp.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), video)
  report = ssa_temporal.temporal_report(config, variables, video)
  assert sorted(report) == ["res4_block0", "res5_block0"]
  for stats in report.values():
    assert (stats["one_hot_rows"] > 0.5) == saturated, stats
    assert len(stats["heads_pick"]) == config.model.ssa.temporal_heads
    if not saturated:
      assert stats["logit_abs_max"] <= 10.0 + 1e-4
