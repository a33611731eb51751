"""benchmarks/retrieval_table.py's pure parts: the oracle, staleness, the rendered docs
and the acceptance checks (no training)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import retrieval_table as rt  # pylint: disable=g-import-not-at-top,wrong-import-position
import run_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

RIGHT = "a large red square in the top left slides right"
LEFT = "a large red square in the top left slides left"  # RIGHT's twin
GROWS = "a small blue circle in the bottom right grows"


def test_the_oracle_ranks_by_shared_attributes_and_ties_count_against_it():
  got = rt.oracle_summary([[RIGHT], [LEFT], [GROWS]])
  assert got["t2v_r1"] == got["v2t_r1"] == 1.0 and got["num_videos"] == 3
  # Two videos with the same caption tie: each caption's video ranks second.
  got = rt.oracle_summary([[RIGHT], [RIGHT], [GROWS]])
  assert got["t2v_r1"] == pytest.approx(1 / 3) and got["t2v_medr"] == 2.0
  # A video's score is its best caption's: video 1 scores 5 of 5 for LEFT (ranked
  # first) and for RIGHT, which ties videos 0 and 1 for both RIGHT queries.
  got = rt.oracle_summary([[RIGHT], [LEFT, RIGHT], [GROWS]])
  assert got["num_captions"] == 4 and got["t2v_r1"] == 0.5
  assert got["v2t_r1"] == pytest.approx(1 / 3)


def _run(row, seed, r1, r5=0.5, seconds=100.0):
  """A cached record of a trained row, as run_one writes it."""
  config = rt.ROWS[row][0]
  summary = {k: 0.0 for k in rt.EVAL_KEYS}
  summary.update(t2v_r1=r1, t2v_r5=r5, t2v_medr=3.0, split="val", step=600)
  return run_cache.run_record(
      row, rt.ROWS, seed,
      [["python", "train.py", f"--config=configs/{config}.py", f"--config.seed={seed}"],
       ["python", "eval.py", f"--config=configs/{config}.py", f"--config.seed={seed}"]],
      [seconds - 20, 20.0], summary)


def _oracle(r1=0.856):
  summary = rt.oracle_summary([[RIGHT], [LEFT], [GROWS]])
  summary["t2v_r1"] = r1
  recipe = run_cache.recipe(*rt.ROWS[rt.ORACLE][:2])
  return dict(row=rt.ORACLE, config="configs/retrieval_synthetic_gta.py", overrides=[],
              commands=["python benchmarks/retrieval_table.py --rows=oracle"], **summary,
              date="today",
              recipe={k: v for k, v in recipe.items() if k.startswith(rt.ORACLE_KEYS)})


def _all_runs(gta=(0.30, 0.34), tsn=(0.10, 0.12), ssa=(0.25, 0.27), oracle=0.856,
              seconds=200.0):
  runs = {row: [_run(row, s, r1, seconds=seconds) for s, r1 in enumerate(values)]
          for row, values in (("gta", gta), ("ssa", ssa), ("tsn", tsn))}
  runs[rt.ORACLE] = [_oracle(oracle)]
  return runs


def test_commands_have_the_ablations_shape():
  train, evaluate = run_cache.commands("retrieval_synthetic_gta", (), 1, "/w/gta_seed1",
                                       "./data")
  assert train == ["python", "train.py", "--config=configs/retrieval_synthetic_gta.py",
                   "--workdir=/w/gta_seed1", "--config.seed=1",
                   "--config.data.data_dir=./data"]
  assert evaluate[1] == "eval.py" and evaluate[2:] == train[2:]


def test_stale_runs_are_left_out(tmp_path):
  current, changed, overridden = (_run("gta", s, 0.3) for s in range(3))
  changed["recipe"]["retrieval.embed_dim"] = 64  # an older recipe
  overridden["overrides"] = ["total_steps=2"]  # not the row's definition
  oracle, other_data = _oracle(), _oracle()
  other_data["recipe"]["data.synthetic.val_per_class"] = 2
  for name, run in (("gta_seed0", current), ("gta_seed1", changed),
                    ("gta_seed2", overridden), ("oracle", oracle),
                    ("oracle_old", other_data)):
    (tmp_path / f"{name}.json").write_text(json.dumps(run))
  runs = run_cache.load_runs(str(tmp_path), rt.ROWS)
  assert [r["seed"] for r in runs["gta"]] == [0]
  assert len(runs[rt.ORACLE]) == 1
  assert not run_cache.is_cached(str(tmp_path / "gta_seed1.json"), rt.ROWS, {})
  assert run_cache.is_cached(str(tmp_path / "gta_seed0.json"), rt.ROWS, {})
  assert not run_cache.is_cached(str(tmp_path / "missing.json"), rt.ROWS, {})


def test_a_model_change_retires_the_trained_runs_but_not_the_oracle():
  recipe = run_cache.recipe(*rt.ROWS["gta"][:2])
  assert recipe["retrieval.embed_dim"] == 128
  recipes = {row: dict(recipe, **{"retrieval.embed_dim": 64}) for row in ("gta", rt.ORACLE)}
  assert not run_cache.is_current(_run("gta", 0, 0.3), rt.ROWS, recipes)
  assert run_cache.is_current(_oracle(), rt.ROWS, recipes)


def test_acceptance_is_met_by_good_numbers():
  lines = rt.acceptance(_all_runs())
  assert len(lines) == 5 and all("**met**" in line for line in lines), lines
  assert "`gta` 0.320, `tsn` 0.110: 2.91x" in lines[0]
  assert "`oracle` 0.856" in lines[3]
  assert "`gta` 200 s, `ssa` 200 s, `tsn` 200 s" in lines[4]


@pytest.mark.parametrize("changes, failing", [
    (dict(gta=(0.15, 0.16)), 0),  # 1.41x TSN
    (dict(ssa=(0.10, 0.11)), 1),
    (dict(oracle=0.79), 3),
    (dict(seconds=361.0), 4),
    (dict(gta=(0.0, 0.0), tsn=(0.0, 0.0)), 0),  # nothing retrieved: not 1.5x of 0
])
def test_acceptance_names_the_failing_check(changes, failing):
  lines = rt.acceptance(_all_runs(**changes))
  assert [i for i, line in enumerate(lines) if "**not met**" in line] == [failing], lines


def test_acceptance_of_rows_without_runs_is_not_measured():
  runs = _all_runs()
  del runs["tsn"]
  lines = rt.acceptance(runs)
  assert lines[0].endswith("not measured (no runs of tsn)")
  assert "**met**" in lines[2] and "not measured" in lines[4]
  assert all("not measured" in line for line in rt.acceptance({}))


def test_render_gives_means_ranges_seeds_and_commands():
  runs = _all_runs()
  doc = rt.render(runs)
  assert "do not edit by hand" in doc
  assert ("| `gta` | GTA video side | `retrieval_synthetic_gta` | 0.320 (0.300-0.340) | "
          "0.500 (0.500-0.500) |") in doc
  assert "| 200 (200-200) s | 0, 1 |" in doc
  assert "| `oracle` | attribute oracle (no model) | `retrieval_synthetic_gta` | 0.856 |" in doc
  assert doc.index("| `gta` |") < doc.index("| `tsn` |") < doc.index("| `oracle` |")
  assert "- `tsn` seed 1 (" in doc and "--config.seed=1`" in doc
  assert "- `oracle` (today): `python benchmarks/retrieval_table.py --rows=oracle`" in doc
  assert "**met**" in doc and "No runs yet" in rt.render({})


def test_summary_block_replaces_only_the_block(tmp_path):
  page = tmp_path / "retrieval.md"
  rt.update_page(str(page), rt.render_summary({}))
  assert page.read_text() == (f"{rt.PAGE_TITLE}\n\n{rt.BEGIN}\n{rt.render_summary({})}"
                              f"{rt.END}\n")
  page.write_text(page.read_text().replace(rt.END, f"{rt.END}\n\nHand-written text."))
  summary = rt.render_summary(_all_runs())
  rt.update_page(str(page), summary)
  text = page.read_text()
  assert text.startswith(f"{rt.PAGE_TITLE}\n\n{rt.BEGIN}\n{summary}{rt.END}")
  assert text.endswith("Hand-written text.\n")
  assert "| `gta` | GTA video side | 0.320 (0.300-0.340) |" in summary
  assert "retrieval_results.md" in summary and "**met**" in summary
