r"""Ablations on the embedded tasks: trains rows, caches each run, writes docs/ablations.md.

    python benchmarks/ablations.py --rows=gta,tsn --seeds=0,1 \
        [--workdir_root=/tmp/ablations] [--data_dir=./data]
    python benchmarks/ablations.py --rows=   # only regenerate the table

Each row is a config of `configs/` with `--config.` overrides, trained and evaluated
with the README's commands (`train.py` then `eval.py`, 600 steps of the synthetic
recipe; `synthetic_long_*` configs for the rows `long_*` of the second task,
`synthetic_long`), one run at a time, once per seed (`--config.seed`). Every finished run is
cached as a small JSON in `benchmarks/ablation_runs/<row>_seed<N>.json`: the config,
overrides, seed, both commands, val top-1 / top-5, the accuracy on each reversed pair
of classes, the train and eval wall times, the resolved config (`recipe`: flattened,
less the seed and data directory) and a `note` where a run needs one. A cached run is
skipped (`--force` re-runs it) unless it is stale: its overrides differ from the
row's definition, or its recipe has another value for a key that the row's config
still has. So a change of recipe in `configs/` or `gta_jax/config_lib.py` retires the
runs it invalidates, while a key added later does not unless the recipe sets it away
from the old behaviour (`run_cache.UNRECORDED_KEYS`), nor do the settings of a
temporal module that the row does not use. Stale runs are re-run and left out of the
table. The table in `docs/ablations.md` is regenerated from every cached run after
each run, with the verdict on each claim of the GTA abstract computed from the
numbers (:data:`CLAIMS`), on each task; the hand-written design of the second task
(between :data:`DESIGN_BEGIN` and :data:`DESIGN_END`) is kept as it is in the page.
The cache's bookkeeping (recipes, staleness, commands) is `run_cache.py`'s.
"""

import json
import os
from typing import Dict, List, Sequence

from absl import app
from absl import flags
import numpy as np
import real_videos
import run_cache

from gta_jax.data.builders import synthetic_long
from gta_jax.data.builders import synthetic_motion

# The overrides of a row trained on the folder of benchmarks/real_videos.py; the
# placeholder becomes --real_videos_dir.
REAL_VIDEOS = ("data.dataset=video_folder", "data.manual_dir={real_videos}")
# GTA's placement in the synthetic recipe until 2026-12-01.
RES3_RES4 = "model.gta.placement=res3:0;res4:0"
# The 3D Non-local at GTA's place, and its temporal position encoding.
NL3D = ("model.nl.kind=3d", "model.nl.placement=res4:0")
POSITION = "model.nl.temporal_position=learned"

# name: (config file, overrides, what the row changes). The GTA rows change one
# switch of configs/synthetic_gta.py each.
ROWS = {
    "gta": ("synthetic_gta", (),
            "GTA alone, the default recipe (after res4, grouped heads)"),
    "tsn": ("synthetic_tsn", (), "TSN, no temporal module"),
    "tsm": ("synthetic_tsm", (), "TSM shift in every block"),
    "ssa": ("synthetic_ssa", (), "SSA alone, the default recipe (8 temporal heads, "
            "y = (M_T - I) v, cosine logits)"),
    "ssa_one_head": ("synthetic_ssa", ("model.ssa.temporal_heads=1",),
                     "SSA, the paper's single temporal attention"),
    "gta_instance": ("synthetic_gta", ("model.gta.temporal_attention=instance",),
                     "GTA, q.k attention over frames instead of the global matrix"),
    "gta_pixel": ("synthetic_gta", ("model.gta.granularity=pixel",),
                  "GTA, pixel branch only"),
    "gta_region": ("synthetic_gta", ("model.gta.granularity=region",),
                   "GTA, region branch only"),
    "gta_cross_channel": ("synthetic_gta", ("model.gta.cross_channel=True",),
                          "GTA, the paper's cross-channel heads"),
    "nl3d": ("synthetic_nl", NL3D, "joint space-time (3D) Non-local at GTA's place"),
    "nl3d_position": ("synthetic_nl", NL3D + (POSITION,),
                      "3D Non-local at GTA's place, learned temporal position encoding"),
    "nl3d_sinusoidal": ("synthetic_nl", NL3D + ("model.nl.temporal_position=sinusoidal",),
                        "3D Non-local at GTA's place, sinusoidal temporal position "
                        "encoding"),
    "tsm_gta": ("synthetic_tsm_gta", (), "GTA on a TSM backbone"),
    "real_gta": ("synthetic_gta", REAL_VIDEOS,
                 "GTA alone on real H.264 files (`benchmarks/real_videos.py`)"),
    "real_tsn": ("synthetic_tsn", REAL_VIDEOS,
                 "TSN on real H.264 files (`benchmarks/real_videos.py`)"),
    "gta_global_instance": (
        "synthetic_gta", ("model.gta.temporal_attention=global+instance",),
        "GTA, global matrix plus q.k logits"),
    "gta_input_s": ("synthetic_gta", ("model.gta.temporal_input=s",),
                    "GTA, temporal step on the spatial attention's output only"),
    "gta_input_xs": ("synthetic_gta", ("model.gta.temporal_input=x+s",),
                     "GTA, temporal step on s + a projection of x"),
    "gta_gate0": ("synthetic_gta", ("model.gta.gate_init=0.0",),
                  "GTA, output BN scale starting at 0 (identity at init)"),
    "gta_softmax": ("synthetic_gta", ("model.gta.global_norm=softmax",),
                    "GTA, A = row softmax of G"),
    "gta_signed": ("synthetic_gta", ("model.gta.global_norm=signed",),
                   "GTA, A = G (signed, unnormalised)"),
    "gta_identity_init": ("synthetic_gta", ("model.gta.global_init=identity",),
                          "GTA, G initialised with a diagonal bias"),
    "gta_region_norm": ("synthetic_gta", ("model.gta.region_norm=True",),
                        "GTA, region scatter-back normalised over K"),
    "gta_reduction4": ("synthetic_gta", ("model.gta.reduction=4",),
                       "GTA with C/4 channels inside the block (C/2 by default)"),
    "gta_res4_res5": ("synthetic_gta", ("model.gta.placement=res4:0;res5:0",),
                      "GTA after res4 and res5 block 0"),
    "gta_pool_keys": ("synthetic_gta", ("model.gta.pool_keys=True",),
                      "GTA, spatial step on 2x2 max-pooled keys (Non-local's sub-sampling)"),
    "gta_res3": ("synthetic_gta", ("model.gta.placement=res3:0",),
                 "GTA after res3 block 0 only"),
    "gta_res3_pool_keys": ("synthetic_gta", ("model.gta.placement=res3:0",
                                             "model.gta.pool_keys=True"),
                           "GTA after res3 block 0 only, on 2x2 max-pooled keys"),
    "ssa_gate0": ("synthetic_ssa", ("model.ssa.gate_init=0.0",),
                  "SSA, output BN scale starting at 0"),
    "ssa_kernel1": ("synthetic_ssa", ("model.ssa.temporal_kernel=1",),
                    "SSA, 1x1x1 temporal conv (blind to order)"),
    "ssa_softmax": ("synthetic_ssa", ("model.ssa.temporal_norm=softmax",),
                    "SSA with the paper's y = M_T v instead of (M_T - I) v"),
    "ssa_dot": ("synthetic_ssa", ("model.ssa.temporal_cosine_scale=0.0",),
                "SSA with the paper's dot-product logits of M_T (over sqrt(d)) "
                "instead of scaled cosines"),
}


def _earlier_recipe(prefix: str, first: Sequence[str], what: str,
                    rows: Sequence[str]) -> Dict[str, tuple]:
  """Rows `<prefix>_<row>`: each row with the overrides `first` before its own and
  GTA after res3 and res4 block 0 (the recipe's placement until 2026-12-01)."""
  return {f"{prefix}_{row}": (ROWS[row][0], tuple(first) + ROWS[row][1] + (RES3_RES4,),
                              f"as `{row}`, with {what}") for row in rows}


# Before grouped GTA heads (and GTA after res4 alone): cross-channel heads.
ROWS.update(_earlier_recipe(
    "xc", ("model.gta.cross_channel=True",),
    "cross-channel heads after res3 and res4 block 0",
    ("gta_instance", "gta_pixel", "gta_region", "gta_softmax")))
# Before GTA moved to res4 alone.
ROWS.update(_earlier_recipe(
    "r34", (), "GTA after res3 and res4 block 0",
    ("gta", "gta_instance", "gta_pixel", "gta_region", "gta_cross_channel", "real_gta",
     "tsm_gta", "gta_reduction4", "gta_pool_keys")))
ROWS["r34_nl3d"] = ("synthetic_nl", ("model.nl.kind=3d",
                                     "model.nl.placement=res3:0;res4:0"),
                    "joint space-time (3D) Non-local after res3 and res4")
# SSA's recipe until 2026-12-07 had the paper's dot-product logits of M_T and its
# y = M_T v; the rows `dot_<row>` are the row's switches on that recipe.
DOT_PRODUCT = ("model.ssa.temporal_cosine_scale=0.0",)
_DOT_PRODUCT_ROWS = {
    "ssa": ((), "SSA alone (8 temporal heads)"),
    "ssa_one_head": (("model.ssa.temporal_heads=1",),
                     "SSA, the paper's single temporal attention"),
    "ssa_separate_value": (("model.ssa.shared_value=False",),
                           "SSA, the temporal conv also gives the value (no SVE)"),
    "ssa_temporal_bias": (("model.ssa.temporal_bias=True",
                           "model.ssa.temporal_bias_init_std=1.0"),
                          "SSA with a learned T x T bias of M_T's logits (GTA's G, init "
                          "std 1, lr x20; not in the paper)"),
    "ssa_bias_identity": (("model.ssa.temporal_bias=True",
                           "model.ssa.temporal_bias_init=identity"),
                          "SSA with a learned T x T bias of M_T's logits starting near "
                          "the identity (as `gta_identity_init`; not in the paper)"),
    "ssa_others_minus_self": (("model.ssa.temporal_norm=others-minus-self",),
                              "SSA with y = (M_T - I) v, M_T's diagonal masked: the "
                              "blend of the other frames minus the frame (not in the "
                              "paper)"),
    "ssa_bias_others_minus_self": (("model.ssa.temporal_norm=others-minus-self",
                                    "model.ssa.temporal_bias=True",
                                    "model.ssa.temporal_bias_init_std=1.0"),
                                   "SSA with y = (M_T - I) v, M_T's diagonal masked and a "
                                   "learned T x T bias of its logits: GTA's softmax(G) - I "
                                   "with content (not in the paper)"),
    "ssa_earlier_minus_self": (("model.ssa.temporal_norm=earlier-minus-self",),
                               "SSA with y = (M_T - I) v, M_T masked to the earlier "
                               "frames: a difference with a direction (not in the paper)"),
    "ssa_minus_identity_cap2": (("model.ssa.temporal_norm=softmax-identity",
                                 "model.ssa.temporal_logit_cap=2.0"),
                                "SSA with y = (M_T - I) v and M_T's content logits "
                                "bounded to (-2, 2) (not in the paper)"),
    # Before 8 SSA heads (2026-12-01):
    "ssa1_separate_value": (("model.ssa.temporal_heads=1", "model.ssa.shared_value=False"),
                            "one-head SSA, the temporal conv also gives the value"),
}
ROWS.update({
    f"dot_{row}": ("synthetic_ssa", DOT_PRODUCT + (
        () if any(o.startswith("model.ssa.temporal_norm=") for o in overrides)
        else ("model.ssa.temporal_norm=softmax",)) + overrides,
                   f"{what}; dot-product logits (the recipe until 2026-12-07)")
    for row, (overrides, what) in _DOT_PRODUCT_ROWS.items()})
# Rows of recipes that are no longer the default: kept in the table, never asked for
# a second seed.
EARLIER_RECIPE_ROWS = tuple(r for r in ROWS if r.startswith(("xc_", "r34_", "dot_")))

# What the project aims to show on the second task: GTA alone beats TSM where the
# dependency is long, i.e. on the long-range order pairs.
LONG_RANGE_CLAIM = ("GTA alone beats TSM where the dependency is long (the long-range "
                    "order pairs)", "long_gta", ("long_tsm",),
                    tuple("/".join(synthetic_long.PAIRS[i]) for i in synthetic_long.EVENT_PAIRS))
# The tasks: (dataset, prefix of its rows, its reversed pairs of classes). The rows
# of the second task, `long_<row>`, are today's rows on the `synthetic_long_*` configs.
TASKS = (("synthetic_motion", "", synthetic_motion.PAIRS),
         ("synthetic_long", "long_", synthetic_long.PAIRS))
# The rows the issue asks of every task, in the order they are worth running.
TABLE_ROWS = ("tsn", "tsm", "gta", "ssa", "nl3d_position", "nl3d_sinusoidal", "nl3d",
              "gta_instance", "gta_pixel", "gta_region", "gta_cross_channel")
ROWS.update({f"long_{row}": (ROWS[row][0].replace("synthetic_", "synthetic_long_", 1),
                             *ROWS[row][1:]) for row in TABLE_ROWS})

# The abstract's claims: (claim, row that has it, rows without it, caveat); on the
# second task the rows `long_<row>`.
CLAIMS = (
    ("temporal attention decoupled from (on top of) spatial attention",
     "gta", ("nl3d_sinusoidal",),
     "against the 3D Non-local with a sinusoidal temporal position encoding, which "
     "can see frame order as GTA does and needs no learning to (`nl3d_position` learns "
     "its table from std 0.02; `nl3d`, without one, is blind to order)"),
    ("a learned global attention matrix shared by all samples", "gta",
     ("gta_instance",), ""),
    ("cross-channel multi-head", "gta_cross_channel", ("gta",), ""),
    ("applied on pixels and on semantically similar regions", "gta",
     ("gta_pixel", "gta_region"), ""),
)

_ROWS = flags.DEFINE_list("rows", list(ROWS), "Rows to run, in order ('' = none).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of each row.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "/tmp/ablations",
                                    "Run folders go to <root>/<row>_seed<N>.")
_DATA_DIR = flags.DEFINE_string("data_dir", "./data", "config.data.data_dir.")
_REAL_VIDEOS_DIR = flags.DEFINE_string(
    "real_videos_dir", "/tmp/gta_jax_real_videos",
    "The folder of benchmarks/real_videos.py of the real_* rows (written if missing).")
_RUNS_DIR = flags.DEFINE_string(
    "runs_dir", os.path.join(run_cache.REPO, "benchmarks", "ablation_runs"),
    "Where the per-run JSON files are cached.")
_DOC = flags.DEFINE_string("doc", os.path.join(run_cache.REPO, "docs", "ablations.md"),
                           "The generated table.")
_README = flags.DEFINE_string("readme", os.path.join(run_cache.REPO, "README.md"),
                              "Its block between the README_BEGIN and README_END "
                              "lines gets the summary table.")
_FORCE = flags.DEFINE_bool("force", False, "Re-run cached runs.")

# The rows of the README's summary, and the lines around it there.
README_ROWS = ("gta", "ssa", "tsm", "tsn", "gta_instance", "ssa_one_head", "tsm_gta",
               "real_gta", "real_tsn")
README_BEGIN = "<!-- generated by benchmarks/ablations.py: begin -->"
README_END = "<!-- generated by benchmarks/ablations.py: end -->"


def commands(row: str, seed: int, workdir: str, data_dir: str,
             real_videos_dir: str) -> List[List[str]]:
  """The train and eval commands of one run, as run from the repository root."""
  config, overrides, _ = ROWS[row]
  return run_cache.commands(
      config, [o.replace("{real_videos}", real_videos_dir) for o in overrides], seed,
      workdir, data_dir)


def task_of(row: str) -> str:
  """The embedded task a row's config trains on (real-video rows: synthetic_motion's)."""
  return "synthetic_long" if ROWS[row][0].startswith("synthetic_long") else "synthetic_motion"


def on_real_videos(row: str) -> bool:
  """Whether a row trains on the folder of benchmarks/real_videos.py."""
  return ROWS[row][1][:len(REAL_VIDEOS)] == REAL_VIDEOS


def pairs_of(row: str) -> Sequence[Sequence[str]]:
  """The reversed pairs of classes of the dataset a row trains on."""
  if on_real_videos(row):
    return real_videos.PAIRS
  return {name: pairs for name, _, pairs in TASKS}[task_of(row)]


def pair_accuracy(predictions_csv: str,
                  pairs: Sequence[Sequence[str]]) -> Dict[str, float]:
  """Accuracy on the videos of each reversed pair of classes."""
  with open(predictions_csv) as f:
    rows = [line.rstrip("\n").split(",") for line in f][1:]
  out = {}
  for first, second in pairs:
    hits = [label == pred for _, label, pred, *_ in rows if label in (first, second)]
    out[f"{first}/{second}"] = float(np.mean(hits)) if hits else float("nan")
  return out


def run_one(row: str, seed: int) -> Dict:
  """Trains and evaluates one row with one seed; returns the cached record."""
  workdir = os.path.join(_WORKDIR_ROOT.value, f"{row}_seed{seed}")
  cmds = commands(row, seed, workdir, _DATA_DIR.value, _REAL_VIDEOS_DIR.value)
  if on_real_videos(row):
    real_videos.make_folder(_REAL_VIDEOS_DIR.value)
  seconds, summary_file = run_cache.train_and_eval(cmds, workdir, _WORKDIR_ROOT.value,
                                                   f"{row}_seed{seed}")
  with open(summary_file) as f:
    summary = json.load(f)
  return run_cache.run_record(row, ROWS, seed, cmds, seconds, dict(
      step=summary["step"], top1=summary["top1"], top5=summary["top5"],
      per_pair=pair_accuracy(summary_file[:-len(".json")] + "_predictions.csv",
                             pairs_of(row))))


def _verdict(runs: Dict[str, List[Dict]], having: str, without: Sequence[str],
             pairs: Sequence[str] = ()) -> str:
  """`supported` when every seed of `having` beats every seed of each row in
  `without`; `not supported` when its mean is not above one of theirs; otherwise
  `inconclusive` (the seed ranges overlap). On val top-1, or with `pairs` (names
  `first/second`) on the mean accuracy of those pairs."""
  if having not in runs or any(r not in runs for r in without):
    missing = [r for r in (having, *without) if r not in runs]
    return f"not measured (no runs of {', '.join(missing)})"
  score = ((lambda r: float(np.mean([r["per_pair"][p] for p in pairs]))) if pairs
           else (lambda r: r["top1"]))
  top1 = lambda row: [score(r) for r in runs[row]]
  what = "pair accuracy" if pairs else "top-1"
  parts = [f"`{having}` {np.mean(top1(having)):.3f}"]
  parts += [f"`{r}` {np.mean(top1(r)):.3f}" for r in without]
  if any(np.mean(top1(having)) <= np.mean(top1(r)) for r in without):
    word = "**not supported**"
  elif all(min(top1(having)) > max(top1(r)) for r in without):
    word = "**supported**"
  else:
    word = "**inconclusive** (the seeds' ranges overlap)"
  return f"{word}: mean {what} {', '.join(parts)}"


def _row_start(row: str, rs: Sequence[Dict]) -> str:
  """A table line's cells up to the top-1 range: name, what, config, mean, min-max."""
  top1 = [r["top1"] for r in rs]
  return (f"| `{row}` | {ROWS[row][2]} | {run_cache.config_cell(*ROWS[row][:2])} | "
          f"**{np.mean(top1):.3f}** | {min(top1):.3f}-{max(top1):.3f} | ")


def render_summary(runs: Dict[str, List[Dict]]) -> str:
  """The README's table: top-1 of the :data:`README_ROWS` that have runs."""
  lines = ["| row | what | config, overrides | val top-1 mean | min-max | seeds |",
           "| --- " * 6 + "|"]
  for row in README_ROWS:
    if row in runs:
      rs = sorted(runs[row], key=lambda r: r["seed"])
      lines.append(_row_start(row, rs) + ", ".join(str(r["seed"]) for r in rs) + " |")
  return "\n".join(lines) + "\n"


DESIGN_BEGIN = ("<!-- hand-written: the design of synthetic_long (kept as is by "
                "benchmarks/ablations.py) -->")
DESIGN_END = "<!-- end of the hand-written design -->"


def design_block(doc: str) -> str:
  """The hand-written design in the text `doc` of the page, markers included ('' if
  it has none)."""
  if DESIGN_BEGIN not in doc or DESIGN_END not in doc:
    return ""
  return doc[doc.index(DESIGN_BEGIN):doc.index(DESIGN_END) + len(DESIGN_END)] + "\n"


def _table(runs: Dict[str, List[Dict]], rows: Sequence[str],
           pairs: Sequence[Sequence[str]]) -> List[str]:
  """The table of the `rows` that have runs, with a column per pair of `pairs`."""
  table = []
  for row in rows:
    rs = sorted(runs[row], key=lambda r: r["seed"])
    means = np.mean([list(r["per_pair"].values()) for r in rs], axis=0)
    table.append(
        _row_start(row, rs)
        + " | ".join(f"{p:.2f}" for p in means)
        + f" | {np.mean([r['train_seconds'] for r in rs]):.0f} s | "
        + ", ".join(str(r["seed"]) for r in rs) + " |")
  if not table:
    return []
  short = [first.replace("moving_", "").replace("rotating_", "") for first, _ in pairs]
  return (["| row | what | config, overrides | top-1 mean | min-max | "
           + " | ".join(f"{s}/rev." for s in short) + " | train time | seeds |",
           "| --- " * (7 + len(short)) + "|"] + table)


def not_run(runs: Dict[str, List[Dict]], seeds: Sequence[int] = (0, 1)) -> List[str]:
  """A line per row that lacks one of `seeds`, with the command that runs what is
  missing: every row of :data:`TABLE_ROWS` on every task, then the other rows of
  today's recipes that have a run (the single switches' second seeds)."""
  table = [prefix + r for _, prefix, _ in TASKS for r in TABLE_ROWS]
  others = [r for r in ROWS if r in runs and r not in table
            and r not in EARLIER_RECIPE_ROWS]
  lines = []
  for row in table + others:
    missing = [s for s in seeds if s not in {r["seed"] for r in runs.get(row, ())}]
    if missing:
      which = ",".join(map(str, missing))
      lines.append(f"- `{row}`, seed{'s' * (len(missing) > 1)} {which}: "
                   f"`python benchmarks/ablations.py --rows={row} --seeds={which}`")
  return lines


def render(runs: Dict[str, List[Dict]], design: str = "") -> str:
  """docs/ablations.md from the cached runs and the hand-written `design` block."""
  lines = [
      "# Ablations on the embedded tasks",
      "",
      "Generated by `python benchmarks/ablations.py` from the runs cached in",
      "`benchmarks/ablation_runs/`; do not edit by hand, except the design of the",
      "second task between its two marker lines. Each row is `train.py` then",
      "`eval.py` of a config of `configs/` with the listed `--config.` overrides, once",
      "per seed; val top-1 (1 clip x centre crop), the mean and the range over seeds.",
      "On `synthetic_motion`: 600 steps of 16 8-frame clips, AdamW, 250 validation",
      "videos; on `synthetic_long` (rows `long_*`, the `synthetic_long_*` configs):",
      "600 steps of 8 20-frame clips, 200 validation videos. Pair accuracy: the",
      "accuracy on the 50 videos of each pair of classes that are each other's reverse",
      "in time (a model blind to frame order gets about 0.5 at best). The `real_*` rows",
      "train on the folder of `benchmarks/real_videos.py` instead: H.264 files of a",
      "camera moving over real photos, in the same five pairs of motions (right, down,",
      "growing, clockwise, brightening and their reverses) and of the same size (1200",
      "training and 250 validation videos), read through the `video_folder` builder.",
      "Train time: the wall time of `train.py` (compilation and data included) on a",
      "2-core CPU shared with other jobs, so only a rough guide.",
      "",
  ]
  if design:
    lines += design.splitlines() + [""]
  for task, prefix, pairs in TASKS:
    lines += [
        f"## The GTA abstract's claims on `{task}`",
        "",
        "A claim is *supported* when every seed of the row that has the feature beats",
        "every seed of the rows without it, *not supported* when its mean is not higher,",
        "*inconclusive* otherwise.",
        "",
    ]
    for claim, having, without, caveat in CLAIMS:
      verdict = _verdict(runs, prefix + having, [prefix + r for r in without])
      lines.append(f"- {claim}: {verdict}" + (f"; {caveat}." if caveat else "."))
    if task == "synthetic_long":
      claim, having, without, pair_names = LONG_RANGE_CLAIM
      lines.append(f"- {claim}: {_verdict(runs, having, without, pair_names)}.")
    rows = [r for r in ROWS if r in runs and task_of(r) == task]
    lines += ["", f"## Rows on `{task}`", ""] + _table(runs, rows, pairs)
    lines.append("")
  missing = not_run(runs)
  if missing:
    lines += ["## Not yet run", "",
              "Runs the table should have, two seeds a row, that it has not: the "
              "rows each task needs, then the second seeds of the other current rows:",
              ""] + missing + [""]
  lines += ["## Commands", "",
            "Each run's exact commands (the repository root as working directory):", ""]
  lines += run_cache.command_lines(ROWS, runs)
  return "\n".join(lines) + "\n"


def write_doc() -> None:
  """Writes docs/ablations.md (keeping its design block) and the README's summary from
  the cached runs."""
  runs = run_cache.load_runs(_RUNS_DIR.value, ROWS)
  design = ""
  if os.path.exists(_DOC.value):
    with open(_DOC.value) as f:
      design = design_block(f.read())
  with open(_DOC.value, "w") as f:
    f.write(render(runs, design))
  with open(_README.value) as f:
    readme = f.read()
  with open(_README.value, "w") as f:
    f.write(run_cache.replace_block(readme, render_summary(runs), README_BEGIN,
                                    README_END))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [r for r in _ROWS.value if r not in ROWS]
  if unknown:
    raise app.UsageError(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
  os.makedirs(_RUNS_DIR.value, exist_ok=True)
  recipes = {}
  for row in _ROWS.value:
    for seed in map(int, _SEEDS.value):
      path = os.path.join(_RUNS_DIR.value, f"{row}_seed{seed}.json")
      if not _FORCE.value and run_cache.is_cached(path, ROWS, recipes):
        continue
      print(f"running {row} seed {seed}", flush=True)
      record = run_one(row, seed)
      run_cache.save(record, path)
      print(f"{row} seed {seed}: top-1 {record['top1']:.3f}, train "
            f"{record['train_seconds']:.0f} s", flush=True)
      write_doc()
  write_doc()


if __name__ == "__main__":
  app.run(main)
