"""The dataset builders by name, and `make_builder(config)` from `config.data`."""

from __future__ import annotations

import importlib

# name -> (module, class, needs a manual_dir)
BUILDERS = {
    "synthetic_motion": ("synthetic_motion", "SyntheticMotion", False),
    "synthetic_captions": ("synthetic_captions", "SyntheticCaptions", False),
    "synthetic_long": ("synthetic_long", "SyntheticLong", False),
    "video_folder": ("video_folder", "VideoFolder", True),
    "kinetics400": ("manual", "Kinetics400", True),
    "something_something_v2": ("manual", "SomethingSomethingV2", True),
    "ucf101": ("manual", "Ucf101", True),
    "hmdb51": ("manual", "Hmdb51", True),
    # Captioned, for text-video retrieval.
    "captioned_folder": ("captioned", "CaptionedFolder", True),
    "msrvtt": ("captioned", "MsrVtt", True),
    "youcook2": ("captioned", "YouCook2", True),
}


def builder_class(name: str):
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; the datasets are {sorted(BUILDERS)}.")
  module, cls, _ = BUILDERS[name]
  return getattr(importlib.import_module(f"gta_jax.data.builders.{module}"), cls)


def needs_manual_dir(name: str) -> bool:
  builder_class(name)  # the clear error for an unknown name
  return BUILDERS[name][2]


def builder_params(data_config, *, num_workers: int = 0) -> tuple[type, dict]:
  """The builder class that `data_config` (a `config.data`) names, and its arguments."""
  name = data_config.dataset
  cls = builder_class(name)
  params = dict(data_dir=data_config.data_dir, jpeg_quality=data_config.jpeg_quality,
                resize_short=data_config.resize_short, num_workers=num_workers)
  if name in ("synthetic_motion", "synthetic_captions", "synthetic_long"):
    params.update(data_config.synthetic.to_dict())
  else:
    params["manual_dir"] = data_config.manual_dir
  if getattr(cls, "HAS_FOLDS", False):
    params["fold"] = data_config.fold
  if name in ("video_folder", "captioned_folder"):
    params["folder_name"] = data_config.folder_name
  if name == "msrvtt":
    params["protocol"] = data_config.split_protocol  # '' = the default, 1k-A
  return cls, params


def prepared_dir(data_config) -> str:
  """Where `data_config`'s dataset is (or will be) prepared; constructs no builder."""
  cls, params = builder_params(data_config)
  from gta_jax.data.builders import base  # pylint: disable=g-import-not-at-top
  return base.prepared_dir(data_config.data_dir, cls.name, cls.config_name_for(**params),
                           str(cls.VERSION))


def make_builder(data_config, *, num_workers: int = 0):
  cls, params = builder_params(data_config, num_workers=num_workers)
  return cls(**params)
