"""The optional DALI decoder (`config.data.decoder='dali'`) against the CPU decoder.

Skipped without NVIDIA DALI (`pip install -e '.[dali]'`). Without a GPU, DALI runs the
same pipeline on the CPU (`device_id=None`); the GPU test needs a CUDA device.
"""

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from gta_jax.data import dali
from gta_jax.data import pipeline
from gta_jax.data import transforms
from gta_jax.training import sharding
from test_data_pipeline import JPEG_ROUNDING
from test_data_pipeline import data_dir  # pylint: disable=unused-import
from test_data_pipeline import photo_jpegs  # pylint: disable=unused-import
from test_data_pipeline import reference_train_clip
from test_data_pipeline import take
from test_data_pipeline import tiny_config


@pytest.mark.parametrize("size", [112, 56])
def test_dali_clips_equal_todays_decoder(photo_jpegs, size):
  """DALI decodes at full size, so its reference is today's cv2 clip itself."""
  scales, idx, clips = (1.0, 0.875, 0.75, 0.66), np.array([0, 1, 3, 5]), 4
  draws = [transforms.train_crop(128, 170, size, scales, True, np.random.default_rng(s))
           for s in range(clips)]
  jpegs = np.empty((clips, len(idx)), object)
  jpegs[:] = [[photo_jpegs[i] for i in idx]] * clips
  got = dali.ClipDecoder(size, jpegs.size)(
      jpegs, np.int32([b for b, _ in draws]), np.bool_([f for _, f in draws]))
  assert got.shape == (clips, len(idx), size, size, 3) and got.dtype == np.uint8
  for clip, (box, flip) in zip(got, draws):
    want = reference_train_clip(photo_jpegs, idx, box, size, flip, 1.0)
    assert np.abs(clip.astype(float) - want).mean() <= JPEG_ROUNDING, (box, flip)


def loaders(data_dir, mesh):  # pylint: disable=redefined-outer-name
  cpu = pipeline.make_train_loader(tiny_config(data_dir), seed=0, process_index=0,
                                   process_count=1)
  gpu = pipeline.make_train_loader(tiny_config(data_dir, decoder="dali"), seed=0,
                                   process_index=0, process_count=1, mesh=mesh)
  return cpu, gpu


def check_same_batches(cpu_batches, dali_batches, mesh):
  for a, b in zip(cpu_batches, dali_batches):
    np.testing.assert_array_equal(a["label"], b["label"])
    assert isinstance(b["video"], jax.Array)
    assert b["video"].sharding == sharding.batch_sharded(mesh)
    video = np.asarray(b["video"])  # 32 crops of 40x48 frames: no DCT scale on the CPU
    assert video.shape == a["video"].shape
    assert np.abs(video.astype(float) - a["video"]).mean() <= JPEG_ROUNDING


def test_dali_loader_same_batches_and_resume(data_dir):  # pylint: disable=redefined-outer-name
  mesh = sharding.make_mesh()
  cpu, gpu = loaders(data_dir, mesh)
  it = iter(gpu)
  check_same_batches(take(iter(cpu), 3), take(it, 3), mesh)
  state = it.get_state()
  resumed = iter(gpu)
  resumed.set_state(state)
  cpu_it = iter(cpu)
  cpu_it.set_state(state)
  check_same_batches(take(cpu_it, 2), take(resumed, 2), mesh)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                    reason="needs a CUDA GPU (DALI's mixed decoding)")
def test_dali_loader_on_gpu(data_dir):  # pylint: disable=redefined-outer-name
  mesh = sharding.make_mesh()
  cpu, gpu = loaders(data_dir, mesh)
  batches = take(iter(gpu), 2)
  assert all(d.platform == "gpu" for d in batches[0]["video"].devices())
  check_same_batches(take(iter(cpu), 2), batches, mesh)
