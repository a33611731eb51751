r"""Train input pipeline throughput: clips/s at T x 224 x 224 from prepared JPEG frames.

  python benchmarks/input_pipeline.py --workers=0,2,4,8 [--batch_size=32] \
      [--data_dir=/tmp/gta_bench_data] [--height=256 --width=340 --video_frames=48]

Prepares (once) a `synthetic_motion` copy with frames of `height x width` (the stored
size of real datasets: short side 256), then times `pipeline.make_train_loader` with
each worker count: TSN segment sampling of 8 frames, multi-scale crop, flip, resize to
224, uint8 batches (normalisation happens on the device). It also times one clip's
stages in this process. Prints one JSON object per measurement; `--out` appends them to
a file. Compare with the train step's clips/s on the same machine.
"""

from __future__ import annotations

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


def make_config(workers: int):
  c = config_lib.base_config()
  c.batch_size = _BATCH.value
  d = c.data
  d.dataset, d.data_dir, d.num_workers = "synthetic_motion", _DATA_DIR.value, workers
  d.num_frames, d.crop_size, d.sampling = _FRAMES.value, _CROP.value, "segment"
  d.synthetic.update(train_per_class=_PER_CLASS.value, val_per_class=1,
                     num_frames=_VIDEO_FRAMES.value, height=_HEIGHT.value, width=_WIDTH.value)
  return c


def emit(record: dict) -> None:
  line = json.dumps(record)
  print(line, flush=True)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(line + "\n")


def stage_times(config) -> dict:
  """One clip's stages in this process: wall and CPU ms (medians over 60 clips).

  The CPU time (`time.thread_time`) is what a clip costs one core even on a busy machine;
  `1000 / cpu_ms_total` is the clips/s one fully used worker can give.
  """
  source = pipeline.open_source(config, "train")
  d = config.data
  rng = np.random.default_rng(0)
  stages = ("read", "decode", "crop_resize_flip")
  wall = {k: [] for k in stages}
  cpu = {k: [] for k in stages}
  sizes = []
  for i in range(60):
    w, c = [time.perf_counter()], [time.thread_time()]
    element = source[i % len(source)]
    w.append(time.perf_counter()), c.append(time.thread_time())
    idx = pipeline._frame_indices(d, len(element["frames"]), train=True, rng=rng)  # pylint: disable=protected-access
    clip = transforms.decode_frames(element["frames"], idx)
    w.append(time.perf_counter()), c.append(time.thread_time())
    transforms.train_transform(clip, d.crop_size, d.scales, d.flip, rng)
    w.append(time.perf_counter()), c.append(time.thread_time())
    for j, k in enumerate(stages):
      wall[k].append(w[j + 1] - w[j])
      cpu[k].append(c[j + 1] - c[j])
    sizes += [len(f) for f in element["frames"]]
  out = {f"{k}_ms": round(1e3 * float(np.median(v)), 2) for k, v in wall.items()}
  out.update({f"{k}_cpu_ms": round(1e3 * float(np.median(v)), 2) for k, v in cpu.items()})
  total = sum(1e3 * float(np.median(v)) for v in cpu.values())
  out["cpu_ms_total"] = round(total, 2)
  out["clips_per_s_per_core"] = round(1e3 / total, 1)
  out["jpeg_kb_per_frame"] = round(float(np.mean(sizes)) / 1024, 1)
  return out


def main(argv):
  del argv
  c = make_config(0)
  t = time.perf_counter()
  meta = pipeline.prepare(c.data)
  emit({"what": "prepared", "seconds": round(time.perf_counter() - t, 1),
        "videos": meta.num_examples, "frame_hw": [_HEIGHT.value, _WIDTH.value],
        "cpus": os.cpu_count()})
  emit({"what": "one clip in-process", **stage_times(c)})
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
