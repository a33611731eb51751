r"""Prepares a dataset into ArrayRecord: `python -m gta_jax.data.prepare`.

  python -m gta_jax.data.prepare --dataset=kinetics400 --manual_dir=/data/k400 \
      --data_dir=./data [--resize_short=256] [--workers=16] [--fold=1] \
      [--split_protocol=1k-A]

Re-running on a prepared dataset is a no-op. `--config` (a recipe's name or a config
file, as train.py takes) fills the defaults, so `--config k400_tsm_r50_8f` prepares exactly
what that training run will read. docs/data.md gives each dataset's expected layout.
`--data_dir` may be a bucket (`gs://...`): the dataset is prepared in a local staging
folder (`$TMPDIR`) and copied up.
"""

from __future__ import annotations

import json
import logging

from absl import app
from absl import flags

from gta_jax import cli
from gta_jax import config_lib
from gta_jax import paths
from gta_jax.data import builders
from gta_jax.data import pipeline
from gta_jax.data import preparation

_CONFIG = cli.define_config_flag("Optional.", lock_config=False)
_DATASET = flags.DEFINE_enum("dataset", None, sorted(builders.BUILDERS), "Dataset name.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the official files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where prepared datasets go.")
_RESIZE_SHORT = flags.DEFINE_integer("resize_short", None, "Short side of stored frames.")
_WORKERS = flags.DEFINE_integer("workers", None, "Decoding processes (0: one per CPU).")
_FOLD = flags.DEFINE_integer("fold", None, "ucf101/hmdb51: official split 1, 2 or 3.")
_FOLDER_NAME = flags.DEFINE_string("folder_name", None,
                                   "video_folder, captioned_folder: name of the prepared "
                                   "copy.")
_SPLIT_PROTOCOL = flags.DEFINE_string("split_protocol", None,
                                      "msrvtt: '1k-A' (default) or 'official'.")


def data_config_from_flags():
  config = _CONFIG.value if _CONFIG.value is not None else config_lib.base_config()
  d = config.data
  for flag, key in ((_DATASET, "dataset"), (_MANUAL_DIR, "manual_dir"),
                    (_DATA_DIR, "data_dir"), (_RESIZE_SHORT, "resize_short"),
                    (_WORKERS, "prepare_workers"), (_FOLD, "fold"),
                    (_FOLDER_NAME, "folder_name"), (_SPLIT_PROTOCOL, "split_protocol")):
    if flag.value is not None:
      d[key] = flag.value
  return d


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  d = data_config_from_flags()
  path = builders.prepared_dir(d)
  was_prepared = pipeline.is_prepared(path)
  meta = preparation.prepare(d)
  report_path = paths.path(path) / "prepare_report.json"
  report = json.loads(report_path.read_text()) if report_path.exists() else {}
  print(f"{meta.name}: {'already prepared' if was_prepared else 'prepared'} in {meta.path}")
  print(f"  {meta.num_classes} classes; videos per split: {meta.num_examples}")
  for split, r in report.items():
    if r["missing"] or r["broken"] or r["bad_frames"]:
      print(f"  {split}: skipped {r['missing']} missing/unlabelled and {r['broken']} broken "
            f"videos, {r['bad_frames']} unreadable frames (listed in {report_path})")


if __name__ == "__main__":
  app.run(main)
