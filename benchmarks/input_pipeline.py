r"""Train input pipeline cost: CPU ms per clip by stage, and clips/s of the loader.

  python benchmarks/input_pipeline.py --workers=0,2,4,8 [--batch_size=32] \
      [--stage_configs=224@256,112@128,112@256] [--step_rates=600,1200] \
      [--data_dir=/tmp/gta_bench_data] [--height=256 --width=340 --video_frames=48]

Prepares (once) `synthetic_motion` copies with frames of `height x width` (the stored
size of real datasets: short side 256) and of each `--stage_configs` stored size. For
each `CROP@SHORT` it makes training clips stage by stage in this process, single-threaded
(TSN segment sampling of T frames, multi-scale crop, resize to CROP, flip, uint8 batches;
normalisation happens on the device), and prints the CPU ms per clip of each stage:
record read, JPEG decode, crop + resize, flip, batch assembly. A table follows: the cores
one accelerator needs at each `--step_rates` clips/s. Then it times
`pipeline.make_train_loader` (`--crop_size` from `height x width`) with each worker count.
Prints one JSON object per measurement; `--out` appends them to a file.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from gta_jax import config_lib
from gta_jax.data import pipeline
from gta_jax.data import preparation
from gta_jax.data import transforms

_WORKERS = flags.DEFINE_list("workers", ["0", "2", "4", "8"], "Worker counts to time.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Clips per batch (one process).")
_BATCHES = flags.DEFINE_integer("num_batches", 40, "Timed batches per worker count.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 0,
                               "Untimed batches first (default: 2 per worker, at least 4).")
_FRAMES = flags.DEFINE_integer("num_frames", 8, "T, frames per clip.")
_CROP = flags.DEFINE_integer("crop_size", 224, "Crop side.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/gta_bench_data", "Prepared data.")
_HEIGHT = flags.DEFINE_integer("height", 256, "Stored frame height.")
_WIDTH = flags.DEFINE_integer("width", 340, "Stored frame width.")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 48, "Frames per stored video.")
_PER_CLASS = flags.DEFINE_integer("videos_per_class", 12, "Train videos per class.")
_OUT = flags.DEFINE_string("out", "", "Append the JSON lines here too.")
_STAGE_CONFIGS = flags.DEFINE_list(
    "stage_configs", ["224@256", "112@128", "112@256"],
    "CROP@SHORT: clips of CROP x CROP from frames stored at short side SHORT (the long side "
    "keeps --height:--width), timed stage by stage.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Rounds of stage timing (the median is kept).")
_CLIPS = flags.DEFINE_integer("clips", 64, "Clips per round of stage timing.")
_STEP_RATES = flags.DEFINE_list(
    "step_rates", ["600", "1200"],
    "An accelerator's train step rates (clips/s) for the cores-per-accelerator table; 600-1200 "
    "is one H200 on R50 TSN 8x224 at 15-30% MFU (193 GFLOP per clip at 790 TFLOP/s).")


def make_config(workers: int, crop: int = 0, short: int = 0):
  """The benchmark's config; `crop` and `short` (stored short side) default to the flags."""
  c = config_lib.base_config()
  c.batch_size = _BATCH.value
  d = c.data
  d.dataset, d.data_dir, d.num_workers = "synthetic_motion", _DATA_DIR.value, workers
  d.num_frames, d.crop_size, d.sampling = _FRAMES.value, crop or _CROP.value, "segment"
  height, width = _HEIGHT.value, _WIDTH.value
  if short:
    height, width = short, round(short * _WIDTH.value / _HEIGHT.value)
  d.synthetic.update(train_per_class=_PER_CLASS.value, val_per_class=1,
                     num_frames=_VIDEO_FRAMES.value, height=height, width=width)
  return c


def emit(record: dict) -> None:
  line = json.dumps(record)
  print(line, flush=True)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(line + "\n")


def _stage_configs() -> list[tuple[int, int]]:
  """`--stage_configs` as `(crop, stored short side)` pairs."""
  out = []
  for item in _STAGE_CONFIGS.value:
    crop, _, short = item.partition("@")
    if not (crop.isdigit() and short.isdigit()):
      raise ValueError(f"--stage_configs: {item!r} is not CROP@SHORT, e.g. 224@256.")
    out.append((int(crop), int(short)))
  return out


def clip_stages(element, data_config, rng) -> tuple[np.ndarray, dict]:
  """One training clip made stage by stage as `transforms.train_clip` makes it.

  Returns the clip and the CPU seconds of each stage.
  """
  d = data_config
  times = {}
  t = time.thread_time()
  frames = element["frames"]
  idx = pipeline._frame_indices(d, len(frames), train=True, rng=rng)  # pylint: disable=protected-access
  box, flip = transforms.train_crop(*transforms.jpeg_size(frames[int(idx[0])]), d.crop_size,
                                    d.scales, d.flip, rng)
  scale = transforms.decode_scale(box, d.crop_size)
  clip = transforms.decode_frames(frames, idx, scale)
  times["decode"], t = time.thread_time() - t, time.thread_time()
  clip = transforms.crop_resize(clip, *(int(v * scale) for v in box), d.crop_size)
  times["crop_resize"], t = time.thread_time() - t, time.thread_time()
  if flip:
    transforms.flip_clip(clip)
  times["flip"] = time.thread_time() - t
  return clip, times


def check_stages(source, data_config, num_clips: int = 8) -> None:
  """Raises unless :func:`clip_stages` makes `transforms.train_clip`'s clips."""
  d = data_config
  for i in range(num_clips):
    rng = np.random.default_rng(i)
    replay = copy.deepcopy(rng)
    clip, _ = clip_stages(source[i], d, rng)
    frames = source[i]["frames"]
    idx = pipeline._frame_indices(d, len(frames), train=True, rng=replay)  # pylint: disable=protected-access
    if not np.array_equal(clip, transforms.train_clip(frames, idx, d.crop_size, d.scales,
                                                      d.flip, replay)):
      raise AssertionError("the staged clip differs from transforms.train_clip's")


def stage_times(config) -> dict:
  """CPU ms per training clip and stage, single-threaded, in this process.

  Each of `--rounds` rounds makes `--clips` clips and batches them by `--batch_size`
  (`np.stack`, as grain's batch does); a stage's figure is the median over rounds of its
  mean CPU time (`time.thread_time`) per clip. CPU time is what a clip costs one core even
  on a busy machine, and `1000 / cpu_ms_total` is the clips/s one fully used core gives.
  """
  source = pipeline.open_source(config, "train")
  d = config.data
  check_stages(source, d)
  rng = np.random.default_rng(0)
  stages = ("read", "decode", "crop_resize", "flip", "batch")
  rounds = {k: [] for k in stages}
  sizes = []
  for r in range(_ROUNDS.value):
    total = dict.fromkeys(stages, 0.0)
    clips = []
    for i in range(_CLIPS.value):
      t = time.thread_time()
      element = source[(r * _CLIPS.value + i) % len(source)]
      total["read"] += time.thread_time() - t
      clip, times = clip_stages(element, d, rng)
      for k, v in times.items():
        total[k] += v
      clips.append(clip)
      sizes.append(np.mean([len(f) for f in element["frames"]]))
    t = time.thread_time()
    for b in range(0, len(clips) - _BATCH.value + 1, _BATCH.value):
      np.stack(clips[b:b + _BATCH.value])
    total["batch"] = (time.thread_time() - t) * len(clips) / max(
        1, len(clips) // _BATCH.value * _BATCH.value)
    for k in stages:
      rounds[k].append(1e3 * total[k] / len(clips))
  out = {f"{k}_cpu_ms": round(float(np.median(v)), 3) for k, v in rounds.items()}
  cpu_ms = sum(float(np.median(v)) for v in rounds.values())
  out["cpu_ms_total"] = round(cpu_ms, 2)
  out["clips_per_s_per_core"] = round(1e3 / cpu_ms, 1)
  out["jpeg_kb_per_frame"] = round(float(np.mean(sizes)) / 1024, 1)
  return out


def cores_table(rows: list[dict]) -> str:
  """Cores per accelerator: its clips/s (`--step_rates`) x CPU seconds per clip."""
  rates = [float(r) for r in _STEP_RATES.value]
  lines = ["clip | CPU ms | " + " | ".join(f"cores at {r:g} clips/s" for r in rates)]
  for row in rows:
    cores = " | ".join(f"{r * row['cpu_ms_total'] / 1e3:.1f}" for r in rates)
    lines.append(f"{row['clip']} | {row['cpu_ms_total']:.2f} | {cores}")
  return "\n".join(lines)


def main(argv):
  del argv
  c = make_config(0)
  t = time.perf_counter()
  meta = preparation.prepare(c.data)
  emit({"what": "prepared", "seconds": round(time.perf_counter() - t, 1),
        "videos": meta.num_examples, "frame_hw": [_HEIGHT.value, _WIDTH.value],
        "cpus": os.cpu_count()})
  rows = []
  for crop, short in _stage_configs():
    sc = make_config(0, crop, short)
    preparation.prepare(sc.data)
    h, w = sc.data.synthetic.height, sc.data.synthetic.width
    rows.append({"what": "CPU per clip", "clip": f"{_FRAMES.value}x{crop} from {h}x{w}",
                 **stage_times(sc)})
    emit(rows[-1])
  if rows:
    print(cores_table(rows), flush=True)
  for workers in (int(w) for w in _WORKERS.value):
    c = make_config(workers)
    loader = pipeline.make_train_loader(c, seed=0, process_index=0, process_count=1)
    it = iter(loader)
    warmup = _WARMUP.value or max(4, 2 * workers)
    t = time.perf_counter()
    for _ in range(warmup):
      batch = next(it)
    start_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(_BATCHES.value):
      batch = next(it)
    seconds = time.perf_counter() - t
    assert batch["video"].shape == (_BATCH.value, _FRAMES.value, _CROP.value, _CROP.value, 3)
    emit({"what": "train loader", "workers": workers, "batch_size": _BATCH.value,
          "clips_per_s": round(_BATCHES.value * _BATCH.value / seconds, 1),
          "batches": _BATCHES.value, "warmup_s": round(start_s, 2),
          "clip": f"{_FRAMES.value}x{_CROP.value}x{_CROP.value}"})
    it.close()


if __name__ == "__main__":
  app.run(main)
