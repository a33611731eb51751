"""Training clips decoded on the GPU by NVIDIA DALI (`config.data.decoder = 'dali'`).

The grain pipeline still reads the videos, samples their frames and draws each clip's
crop and flip (`pipeline.TrainTransform`), so the batches, their order and the resumable
position are those of the CPU decoder. It hands each clip's sampled JPEG frames and
draws to DALI, which decodes the crop's region on the GPU (`decoders.image_slice`,
`mixed`: nvJPEG), resizes it bilinearly and flips it there. Each device of this process
decodes its own rows of the batch, and the rows come out as one global `jax.Array`
sharded along the mesh's `data` axis. The host does the I/O and the sampling only.

Optional: `pip install -e '.[dali]'` (`nvidia-dali-cuda130`; `nvidia-dali-cuda120` for a
CUDA 12 JAX). On CPU devices (`ClipDecoder(device_id=None)`) the same DALI pipeline
runs on the host, which is how the tests compare it with the CPU decoder without a GPU.
"""

from __future__ import annotations

import numpy as np


def _dali():
  try:
    import nvidia.dali  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "config.data.decoder='dali' needs NVIDIA DALI: pip install -e '.[dali]' "
        "(nvidia-dali-cuda130), or nvidia-dali-cuda120 for CUDA 12.") from e
  return nvidia.dali


def _per_frame(values: np.ndarray, frames_per_clip: int, dtype) -> list[np.ndarray]:
  """Each clip's row of `values`, once per frame: DALI's samples are frames."""
  return list(np.repeat(np.asarray(values, dtype), frames_per_clip, axis=0))


class ClipDecoder:
  """Batches of clips' JPEG frames, crop boxes and flips -> uint8 `(B, T, S, S, 3)`.

  One DALI pipeline on GPU `device_id` (the result a `jax.Array` on that GPU), or on the
  CPU when `device_id` is None (a numpy array). Its samples are frames: `max_frames` is
  the most frames (clips x T) one call may bring.
  """

  def __init__(self, crop_size: int, max_frames: int, device_id: int | None = None,
               num_threads: int = 2):
    dali = _dali()
    fn, types = dali.fn, dali.types
    self.crop_size = int(crop_size)
    self.device_id = device_id
    self._pipe = dali.Pipeline(batch_size=int(max_frames), num_threads=num_threads,
                               device_id=device_id, prefetch_queue_depth=1)
    with self._pipe:
      jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
      anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
      shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
      flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
      frames = fn.decoders.image_slice(
          jpegs, anchor, shape, device="cpu" if device_id is None else "mixed",
          output_type=types.RGB, axis_names="HW", normalized_anchor=False,
          normalized_shape=False, jpeg_fancy_upsampling=True)  # libjpeg's default
      # Bilinear without antialiasing, as the CPU decoder's cv2 resize.
      frames = fn.resize(frames, resize_x=self.crop_size, resize_y=self.crop_size,
                         interp_type=types.INTERP_LINEAR, antialias=False)
      self._pipe.set_outputs(fn.flip(frames, horizontal=flip))
    self._pipe.build()

  def __call__(self, jpegs: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
    """`jpegs` `(B, T)` of bytes, `boxes` `(B, 4)` `(top, left, h, w)`, `flips` `(B,)`."""
    b, t = jpegs.shape
    self._pipe.feed_input("jpegs", [np.frombuffer(j, np.uint8) for j in jpegs.reshape(-1)])
    self._pipe.feed_input("anchor", _per_frame(boxes[:, :2], t, np.float32))
    self._pipe.feed_input("shape", _per_frame(boxes[:, 2:], t, np.float32))
    self._pipe.feed_input("flip", _per_frame(flips, t, np.int32))
    (frames,) = self._pipe.run()
    shape = (b, t, self.crop_size, self.crop_size, 3)
    # Copies, on the host or the GPU: DALI reuses its output buffer at the next run.
    if self.device_id is None:
      return np.array(frames.as_tensor()).reshape(shape)
    import jax  # pylint: disable=g-import-not-at-top
    return jax.dlpack.from_dlpack(frames.as_tensor()).reshape(shape).copy()


class TrainBatches:
  """A `pipeline.BatchIterator` of undecoded clips -> batches with `video` on the devices.

  `get_state`/`set_state` are the wrapped iterator's: the same batch positions.
  """

  def __init__(self, batches, crop_size: int, mesh):
    import jax  # pylint: disable=g-import-not-at-top
    from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
    self._jax = jax
    self._batches = batches
    self._sharding = sharding.batch_sharded(mesh)
    self._devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self._crop_size = crop_size
    self._decoders = {}

  def __iter__(self):
    return self

  def _decode(self, device, jpegs, boxes, flips):
    """One device's rows, decoded on it (on the host, then copied, for a CPU device)."""
    gpu = device.platform == "gpu"
    if device not in self._decoders:
      self._decoders[device] = ClipDecoder(
          self._crop_size, jpegs.size, device_id=device.local_hardware_id if gpu else None)
    clips = self._decoders[device](jpegs, boxes, flips)
    return clips if gpu else self._jax.device_put(clips, device)

  def __next__(self) -> dict:
    batch = dict(next(self._batches))
    jpegs, boxes, flips = batch.pop("jpegs"), batch.pop("box"), batch.pop("flip")
    b, t = jpegs.shape
    process_count = self._jax.process_count()
    global_shape = (b * process_count, t, self._crop_size, self._crop_size, 3)
    first = self._jax.process_index() * b  # this process's rows of the global batch
    arrays = []
    for device, index in self._sharding.addressable_devices_indices_map(global_shape).items():
      start, stop, _ = index[0].indices(global_shape[0])
      rows = slice(start - first, stop - first)
      arrays.append(self._decode(device, jpegs[rows], boxes[rows], flips[rows]))
    batch["video"] = self._jax.make_array_from_single_device_arrays(
        global_shape, self._sharding, arrays)
    return batch

  def get_state(self):
    return self._batches.get_state()

  def set_state(self, state) -> None:
    self._batches.set_state(state)

  def close(self) -> None:
    self._batches.close()


class TrainLoader:
  """An iterable of training batches decoded by DALI; each `iter()` starts at batch 0."""

  def __init__(self, loader, crop_size: int, mesh):
    _dali()  # without DALI, fail here with the install command, not at the first batch
    self._loader = loader
    self._crop_size = crop_size
    self._mesh = mesh

  def __iter__(self) -> TrainBatches:
    return TrainBatches(iter(self._loader), self._crop_size, self._mesh)
