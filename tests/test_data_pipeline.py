"""The grain pipeline on a tiny `synthetic_motion`: shapes, resume, sharding, eval coverage."""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax.data import pipeline
from gta_jax.data import preparation
from gta_jax.data import transforms


def tiny_config(data_dir, **data):
  c = config_lib.synthetic_config()
  c.data.data_dir = str(data_dir)
  c.data.num_workers = 0
  c.data.synthetic.train_per_class = 3  # 30 train videos
  c.data.synthetic.val_per_class = 2  # 20 val videos
  c.data.synthetic.num_frames = 12
  c.batch_size = 4
  c.eval.batch_size = 3
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  meta = preparation.prepare_dataset(tiny_config(d))
  assert meta.num_examples == {"train": 30, "val": 20}
  return d


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_meta_and_noop(data_dir):
  c = tiny_config(data_dir)
  meta = preparation.prepare_dataset(c)  # prepared: a no-op
  assert meta.name == "synthetic_motion" and meta.num_classes == 10
  assert meta.class_names[:2] == ("moving_right", "moving_left")


def test_shards_are_stored_uncompressed(data_dir, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from gta_jax.data.builders import base  # pylint: disable=g-import-not-at-top
  shards = sorted(data_dir.rglob("*.array_record-*"))
  assert len(shards) >= 2  # train and val
  for shard in shards:
    options = array_record_module.ArrayRecordReader(str(shard)).writer_options_string()
    assert "uncompressed" in options.split(","), (shard, options)
  # A zstd file (array_record's default, what tfds writes) keeps its records.
  path = str(tmp_path / "zstd.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  records = [bytes([i]) * (100 * i) for i in range(70)]
  for r in records:
    writer.write(r)
  writer.close()
  base.store_uncompressed(path, chunk=16)
  reader = array_record_module.ArrayRecordReader(path)
  assert "uncompressed" in reader.writer_options_string().split(",")
  assert reader.read(0, reader.num_records()) == records


def test_num_classes_mismatch_names_both(data_dir):
  c = tiny_config(data_dir)
  c.model.num_classes = 174
  with pytest.raises(ValueError, match=r"174.*10 classes"):
    preparation.prepare_dataset(c)


@pytest.mark.parametrize("sampling", ["segment", "dense"])
def test_train_batch_shapes(data_dir, sampling):
  c = tiny_config(data_dir, sampling=sampling, frame_interval=2)
  batch = next(iter(pipeline.make_train_loader(c, seed=0, process_index=0, process_count=1)))
  assert batch["video"].shape == (4, 8, 32, 32, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert set(batch["label"].tolist()) <= set(range(10))


def test_train_loader_is_infinite_and_reshuffles(data_dir):
  c = tiny_config(data_dir)
  loader = pipeline.make_train_loader(c, seed=0, process_index=0, process_count=1,
                                      with_index=True)
  order = np.concatenate([b["video_index"] for b in take(iter(loader), 15)])  # 2 epochs
  first, second = order[:30], order[30:60]
  assert sorted(first) == sorted(second) == list(range(30))
  assert not np.array_equal(first, second)  # shuffled by (seed, epoch)


def test_resume_from_state_is_exact(data_dir):
  c = tiny_config(data_dir)
  make = lambda: pipeline.make_train_loader(c, seed=3, process_index=0, process_count=1)
  it = iter(make())
  take(it, 5)
  state = it.get_state()
  expected = take(it, 6)  # crosses the epoch boundary (30 videos, batch 4)
  resumed = iter(make())
  resumed.set_state(state)
  assert_same_batches(take(resumed, 6), expected)


def test_two_processes_split_the_one_process_batches(data_dir):
  c = tiny_config(data_dir)
  single = take(iter(pipeline.make_train_loader(c, seed=0, process_index=0,
                                                process_count=1, with_index=True)), 14)
  halves = [take(iter(pipeline.make_train_loader(c, seed=0, process_index=p,
                                                 process_count=2, with_index=True)), 14)
            for p in range(2)]
  assert halves[0][0]["video"].shape[0] == 2
  for i, whole in enumerate(single):
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][i][key], halves[1][i][key]]), whole[key])
  # The first epoch (30 videos, 7 global batches of 4) reads every video at most once,
  # and the two processes' shares of it are disjoint.
  seen = [np.concatenate([b["video_index"] for b in h[:7]]).tolist() for h in halves]
  assert len(set(seen[0] + seen[1])) == 28 and not set(seen[0]) & set(seen[1])


def test_decoder_must_be_known_and_dali_needs_the_mesh(data_dir):
  with pytest.raises(ValueError, match=r"config.data.decoder must be one of .*'gpu'"):
    pipeline.make_train_loader(tiny_config(data_dir, decoder="gpu"), seed=0,
                               process_index=0, process_count=1)
  with pytest.raises(ValueError, match="mesh=mesh"):
    pipeline.make_train_loader(tiny_config(data_dir, decoder="dali"), seed=0,
                               process_index=0, process_count=1)


def test_batch_must_divide_by_processes(data_dir):
  c = tiny_config(data_dir)
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    pipeline.make_train_loader(c, seed=0, process_index=0, process_count=3)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_split_once(data_dir, process_count):
  c = tiny_config(data_dir)
  c.eval.batch_size = 3 * process_count
  per_process, labels = [], {}
  for p in range(process_count):
    loader = pipeline.make_eval_loader(c, "val", process_index=p, process_count=process_count)
    batches = list(loader)
    assert len(batches) == loader.num_batches
    per_process.append(len(batches))
    for b in batches:
      assert b["video"].shape == (3, 1, 8, 32, 32, 3) and b["video"].dtype == np.uint8
      assert b["mask"].dtype == np.bool_ and b["video_index"].dtype == np.int64
      for i, m, y, v in zip(b["video_index"], b["mask"], b["label"], b["video"]):
        if m:
          assert i not in labels  # never twice
          labels[int(i)] = int(y)
        else:
          assert i == -1 and y == -1 and not v.any()
  assert len(set(per_process)) == 1  # the same number of batches everywhere
  assert sorted(labels) == list(range(20))
  source = pipeline.open_source(c, "val")
  assert all(source[i]["label"] == y for i, y in labels.items())


def test_eval_views_and_crops(data_dir):
  c = tiny_config(data_dir, test_scale=36)
  c.eval.num_clips, c.eval.num_crops = 2, 3
  batch = next(iter(pipeline.make_eval_loader(c, "val", process_index=0, process_count=1)))
  assert batch["video"].shape == (3, 6, 8, 32, 32, 3)
  video = batch["video"][0]
  # Frames 40x48 -> short side 36 -> 36x43: the three crops are left, centre, right.
  assert not np.array_equal(video[0], video[2])
  # Two temporal views sample different frames.
  assert not np.array_equal(video[0], video[3])


def jpeg_clip(frames):
  return [transforms.encode_jpeg(f) for f in frames]


def test_train_same_crop_and_flip_on_every_frame():
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
  jpegs = jpeg_clip([frame])
  outs = set()
  for seed in range(40):
    out = transforms.train_clip(jpegs, np.zeros(8, int), 32, (1.0, 0.875, 0.75, 0.66), True,
                                np.random.default_rng(seed))
    assert out.shape == (8, 32, 32, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[0], f) for f in out[1:])  # one crop/flip per clip
    outs.add(out[0].tobytes())
  assert len(outs) > 10  # the crops and flips do vary between clips


def test_flip_happens_only_when_enabled():
  rng = np.random.default_rng(0)
  jpegs = jpeg_clip(rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8))
  clip = np.stack([transforms.decode_jpeg(j) for j in jpegs])
  idx = np.arange(2)
  flipped = [transforms.train_clip(jpegs, idx, 32, (1.0,), True, np.random.default_rng(s))
             for s in range(20)]
  assert any(np.array_equal(f, clip[:, :, ::-1]) for f in flipped)
  assert any(np.array_equal(f, clip) for f in flipped)
  for s in range(20):
    out = transforms.train_clip(jpegs, idx, 32, (1.0,), False, np.random.default_rng(s))
    np.testing.assert_array_equal(out, clip)


# Decoding at a DCT scale against today's decoder (cv2, full size) -----------------------

# Mean absolute difference allowed between a clip and today's decoder's: JPEG rounding.
JPEG_ROUNDING = 2.0  # on the 0..255 scale, i.e. 2/255


@pytest.fixture(scope="module")
def photo_jpegs():
  """Six 128x170 frames of a photo (matplotlib's sample), panning: natural detail."""
  import matplotlib.cbook  # pylint: disable=g-import-not-at-top
  import cv2  # pylint: disable=g-import-not-at-top
  photo = cv2.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
  frames = [cv2.resize(photo[10 * k:10 * k + 450, 8 * k:8 * k + 598], (170, 128),
                       interpolation=cv2.INTER_AREA)[..., ::-1] for k in range(6)]
  return jpeg_clip(frames)


def cv2_decode(jpegs, indices):
  """Today's decoder: cv2, full size, RGB."""
  import cv2  # pylint: disable=g-import-not-at-top
  return np.stack([cv2.imdecode(np.frombuffer(jpegs[i], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                   for i in indices])


def reference_train_clip(jpegs, indices, box, size, flip, scale):
  """cv2 full-size decode, box-filtered to `scale`, the crop resized bilinearly, flipped."""
  import cv2  # pylint: disable=g-import-not-at-top
  frames = cv2_decode(jpegs, indices)
  if scale < 1:
    frames = [cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
              for f in frames]
  top, left, h, w = (round(v * scale) for v in box)
  out = np.stack([cv2.resize(np.ascontiguousarray(f[top:top + h, left:left + w]),
                             (size, size), interpolation=cv2.INTER_LINEAR) for f in frames])
  return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("size", [112, 56, 28])
def test_train_clips_equal_todays_decoder(photo_jpegs, size):
  """Same frames, crop and flip as a cv2 full-size decode, within JPEG rounding.

  At scale 1 (every 112 crop of these 128-px frames) the reference is today's clip
  itself; at 1/2 and 1/4 it is today's decode box-filtered to that scale, which is what
  libjpeg-turbo's scaled IDCT computes.
  """
  scales = (1.0, 0.875, 0.75, 0.66)
  idx = np.array([0, 1, 3, 5])
  seen = set()
  for seed in range(12):
    rng = np.random.default_rng(seed)
    got = transforms.train_clip(photo_jpegs, idx, size, scales, True, rng)
    rng = np.random.default_rng(seed)
    box = transforms.multiscale_crop_params(128, 170, size, scales, rng)
    flip = rng.random() < 0.5
    scale = transforms.decode_scale(box, size)
    assert scale == 1 or min(box[2:]) * scale >= size  # never coarser than the output
    seen.add(scale)
    want = reference_train_clip(photo_jpegs, idx, box, size, flip, scale)
    diff = np.abs(got.astype(float) - want).mean()
    assert diff <= JPEG_ROUNDING, (seed, box, scale, flip, diff)
  assert seen >= {112: {1.0}, 56: {1.0, 0.5}, 28: {0.5, 0.25}}[size]


@pytest.mark.parametrize("test_scale,num_crops", [(128, 1), (64, 3), (32, 1)])
def test_eval_clips_equal_todays_decoder(photo_jpegs, test_scale, num_crops):
  idx = np.array([0, 2, 2, 4])  # a repeated frame, as dense clips loop
  scale = transforms.short_side_scale(128, 170, test_scale)
  assert scale == {128: 1.0, 64: 0.5, 32: 0.5}[test_scale]  # 170 / 4 is not whole
  got = transforms.eval_crops(transforms.decode_frames(photo_jpegs, idx, scale), 28,
                              test_scale, num_crops)
  want = transforms.eval_crops(cv2_decode(photo_jpegs, idx), 28, test_scale, num_crops)
  assert got.shape == want.shape == (num_crops, 4, 28, 28, 3)
  assert np.abs(got.astype(float) - want).mean() <= JPEG_ROUNDING


def test_frames_of_different_sizes_are_a_clear_error():
  jpegs = jpeg_clip([np.zeros((32, 40, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)])
  with pytest.raises(ValueError, match=r"frame 1 is \(32, 48\).*frame 0 .* \(32, 40\)"):
    transforms.decode_frames(jpegs, np.arange(2))
  with pytest.raises(ValueError, match="3-byte frame"):
    transforms.decode_frames([b"abc"], np.arange(1))


def test_normalize_numpy_and_jax():
  import jax.numpy as jnp
  x = np.full((2, 3), 0, np.uint8)[..., None].repeat(3, -1)
  x[..., 0] = 124
  want = (x.astype(np.float32) - np.array(transforms.IMAGENET_MEAN, np.float32)) / np.array(
      transforms.IMAGENET_STD, np.float32)
  got = transforms.normalize(x)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got_jax = transforms.normalize(jnp.asarray(x))
  assert isinstance(got_jax, jnp.ndarray) and got_jax.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got_jax), want, rtol=1e-6)


def test_worker_processes_yield_the_same_batches(data_dir):
  # Per-element randomness comes from (seed, position), so workers change nothing; the
  # state saved from a worker iterator also resumes exactly.
  c0 = tiny_config(data_dir)
  c1 = tiny_config(data_dir, num_workers=2)
  expected = take(iter(pipeline.make_train_loader(c0, seed=5, process_index=0,
                                                  process_count=1)), 6)
  it = iter(pipeline.make_train_loader(c1, seed=5, process_index=0, process_count=1))
  got = take(it, 3)
  state = it.get_state()
  assert_same_batches(got, expected[:3])
  resumed = iter(pipeline.make_train_loader(c0, seed=5, process_index=0, process_count=1))
  resumed.set_state(state)
  assert_same_batches(take(resumed, 3), expected[3:])
  evals = [list(pipeline.make_eval_loader(c, "val", process_index=0, process_count=1))
           for c in (c0, c1)]
  assert_same_batches(*evals)


def test_input_workers_leave_sigterm_to_the_main_process(data_dir):
  """A preemption may SIGTERM the whole process group: the workers read on (the main
  process saves a checkpoint, then stops them)."""
  expected = take(iter(pipeline.make_train_loader(tiny_config(data_dir), seed=5,
                                                  process_index=0, process_count=1)), 4)
  before = set(multiprocessing.active_children())
  it = iter(pipeline.make_train_loader(tiny_config(data_dir, num_workers=2), seed=5,
                                       process_index=0, process_count=1))
  got = take(it, 2)
  workers = set(multiprocessing.active_children()) - before
  assert len(workers) == 2
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(0.5)
  assert all(worker.is_alive() for worker in workers)
  got += take(it, 2)
  assert_same_batches(got, expected)
  it.close()


def test_state_goes_through_grains_checkpoint_handler(data_dir, tmp_path):
  import grain
  from etils import epath
  c = tiny_config(data_dir)
  it = iter(pipeline.make_train_loader(c, seed=1, process_index=0, process_count=1))
  take(it, 4)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  expected = take(it, 2)
  fresh = iter(pipeline.make_train_loader(c, seed=1, process_index=0, process_count=1))
  handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
  assert_same_batches(take(fresh, 2), expected)


def prepare_in_three_threads(c, monkeypatch):
  """`prepare_dataset(c)` from three threads at once: their results, and how many
  datasets were built."""
  import threading
  from gta_jax.data import builders
  calls = []
  real = builders.make_builder
  monkeypatch.setattr(builders, "make_builder",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  results, start = [], threading.Barrier(3)

  def worker():
    start.wait()
    results.append(preparation.prepare_dataset(c))

  threads = [threading.Thread(target=worker) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert len(results) == 3 and all(r == results[0] for r in results)
  return results, len(calls)


def test_concurrent_preparation_is_race_free(tmp_path, monkeypatch):
  import socket
  from gta_jax.data import builders
  c = tiny_config(tmp_path)
  c.data.synthetic.train_per_class = c.data.synthetic.val_per_class = 1
  # A lock left by a dead process on this host is cleared, not waited on forever.
  path = builders.prepared_dir(c.data)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as f:
    f.write(f"{socket.gethostname()} 999999999")
  _, builds = prepare_in_three_threads(c, monkeypatch)
  assert builds == 1  # one preparer, the others waited for it
  assert not os.path.exists(path + ".lock")


def prepare_beside_a_lock(tmp_path, lock_text, timeout_s=5.0):
  """Runs `preparation._run_once` on a folder whose lock holds `lock_text`; whether it
  prepared (wrote the folder's dataset_info.json) within `timeout_s`."""
  import threading
  path = str(tmp_path / "dataset")
  os.makedirs(path)
  with open(path + ".lock", "w") as f:
    f.write(lock_text)
  info = os.path.join(path, pipeline.INFO_FILE)
  prepared = []
  prepare = lambda: prepared.append(open(info, "w").close())
  thread = threading.Thread(target=preparation._run_once, args=(path, prepare, 0.01))
  thread.start()
  thread.join(timeout_s)
  open(info, "w").close()  # lets a waiter go
  thread.join()
  return bool(prepared)


@pytest.mark.parametrize("start", ["1", None])
def test_a_lock_of_this_pid_from_an_earlier_process_is_stale(tmp_path, start):
  """A restarted container's Python often has the pid of the one that left the lock
  (PID 1): the start time tells them apart; a lock without one (written before locks
  held it) cannot be this process's."""
  import socket
  from gta_jax import processes
  assert start != processes.start_time(os.getpid())
  text = f"{socket.gethostname()} {os.getpid()}" + (f" {start}" if start else "")
  assert prepare_beside_a_lock(tmp_path, text)
  assert not os.path.exists(str(tmp_path / "dataset.lock"))


def test_a_lock_of_a_live_process_is_waited_on(tmp_path):
  """The counter-test: this very process (another thread) holds the lock."""
  assert not prepare_beside_a_lock(tmp_path, preparation._lock_text(), timeout_s=0.5)


def test_a_breaker_left_by_a_killed_process_is_stale(tmp_path):
  """A process killed while removing a dead process's lock leaves `.lock.break`: an
  old one is removed, and the lock broken."""
  import socket
  breaker = str(tmp_path / "dataset.lock.break")
  open(breaker, "w").close()
  os.utime(breaker, (time.time() - 3600,) * 2)
  assert prepare_beside_a_lock(tmp_path, f"{socket.gethostname()} 999999999 1")
  assert not os.path.exists(breaker)


def test_waiters_on_a_lock_being_broken_sleep(tmp_path, monkeypatch):
  """While another process breaks a dead process's lock (a fresh `.lock.break`), a
  waiter polls at `poll_s`, it does not spin."""
  import socket
  open(str(tmp_path / "dataset.lock.break"), "w").close()
  checks, sleeps = [], []
  real_check = preparation._held_by_dead_process

  def check(lock):
    checks.append(1)
    assert len(checks) < 100, "spinning"
    return real_check(lock)

  monkeypatch.setattr(preparation, "_held_by_dead_process", check)
  monkeypatch.setattr(preparation.time, "sleep", sleeps.append)
  path = str(tmp_path / "dataset")
  with open(path + ".lock", "w") as f:
    f.write(f"{socket.gethostname()} 999999999 1")
  with pytest.raises(AssertionError, match="spinning"):
    preparation._run_once(path, lambda: None, poll_s=0.5)
  assert sleeps == [0.5] * len(sleeps) and len(sleeps) >= len(checks) - 2


def test_concurrent_preparation_into_a_bucket_builds_once(bucket, tmp_path, monkeypatch):
  """Three processes (threads, each with its own lease) preparing the same gs://
  dataset: one builds and copies it up, the others wait for it."""
  from gta_jax import paths
  from gta_jax.data import builders
  c = tiny_config(f"gs://bucket/{tmp_path.name}")
  c.data.synthetic.train_per_class = c.data.synthetic.val_per_class = 1
  monkeypatch.setattr(preparation, "_BUCKET_POLL_S", 0.2)
  results, builds = prepare_in_three_threads(c, monkeypatch)
  assert results[0].num_examples == {"train": 10, "val": 10}
  assert builds == 1  # one preparer, the others waited for it
  assert not paths.path(builders.prepared_dir(c.data) + ".lock").exists()  # released


def plant_bucket_lock(path, **fields):
  """Plants the preparation lock of the gs:// dataset `path`, held by a holder like
  this process (its fields overridden)."""
  from gta_jax.training import lease as lease_lib
  holder = lease_lib.Holder(**dict(lease_lib.Holder.me(300.0).__dict__, **fields))
  lock = lease_lib.ObjectLease(path + ".lock", 300.0)
  assert lock._store.create(holder.encode())  # pylint: disable=protected-access
  return lock


def prepare_in_a_bucket(path):
  """Runs `preparation._run_once_leased` on the gs:// `path` in a thread; returns the
  thread and a list that gets the lock it prepared under."""
  import threading
  from gta_jax import paths
  prepared = []

  def prepare(lock):
    prepared.append(lock)
    (paths.path(path) / pipeline.INFO_FILE).write_text("{}")

  thread = threading.Thread(target=preparation._run_once_leased,
                            args=(path, prepare, 0.01, 300.0))
  thread.start()
  return thread, prepared


@pytest.mark.parametrize("holder,why", [
    (dict(pid=999999999), "its process 999999999 on this host is gone"),
    (dict(host="elsewhere", pid=1, heartbeat=0.0), "its heartbeat is older than 300 s"),
])
def test_a_bucket_preparation_lock_of_a_dead_holder_is_taken_over(bucket, tmp_path,
                                                                  caplog, holder, why):
  import logging
  from gta_jax import paths
  path = f"gs://bucket/{tmp_path.name}/dataset"
  plant_bucket_lock(path, **holder)
  with caplog.at_level(logging.WARNING):
    thread, prepared = prepare_in_a_bucket(path)
    thread.join(30)
  assert not thread.is_alive() and len(prepared) == 1
  assert f"Took over the lease {path}.lock from a dead run" in caplog.text
  assert why in caplog.text
  assert not paths.path(path + ".lock").exists()  # released


def test_a_bucket_preparation_lock_of_a_live_holder_is_waited_on(bucket, tmp_path):
  """Its holder (this process, beating) prepares: the other waits; released without
  the data (the preparer failed), the lock is taken and the data prepared."""
  path = f"gs://bucket/{tmp_path.name}/dataset"
  planted = plant_bucket_lock(path)
  thread, prepared = prepare_in_a_bucket(path)
  thread.join(1.0)
  assert thread.is_alive() and not prepared
  assert planted._store.replace(planted._store.read()[1], None) == ""  # pylint: disable=protected-access
  thread.join(30)
  assert not thread.is_alive() and len(prepared) == 1


def test_a_bucket_preparer_that_lost_its_lock_does_not_copy_up(bucket, tmp_path,
                                                               monkeypatch, caplog):
  """Taken for dead (its heartbeat late) and taken over, it leaves the copy to the
  new holder: two preparers never write the same dataset."""
  import dataclasses
  import logging
  from gta_jax import paths
  from gta_jax.data import builders
  from gta_jax.training import lease as lease_lib
  c = tiny_config(f"gs://bucket/{tmp_path.name}")
  target = builders.prepared_dir(c.data)
  lock = lease_lib.ObjectLease(target + ".lock", 0.5)
  assert lock.try_acquire() is None

  def build(local, num_workers):
    del num_workers
    os.makedirs(builders.prepared_dir(local))
    open(os.path.join(builders.prepared_dir(local), pipeline.INFO_FILE), "w").close()
    store = lease_lib.ObjectLease(lock.path, 300.0)._store  # pylint: disable=protected-access
    holder, version = store.read()
    assert store.replace(version, dataclasses.replace(
        holder, host="elsewhere", pid=7, token="x", timeout_s=3600.0).encode())
    assert lock.lost.wait(5)

  monkeypatch.setattr(preparation, "_build", build)
  with caplog.at_level(logging.WARNING):
    preparation._prepare_remote(c.data, 0, lock)
  lock.release()
  assert not paths.path(target).exists()
  assert f"Not copying the prepared dataset to {target}: this process lost" in caplog.text
  assert "now held by host elsewhere, process 7" in caplog.text


def test_a_dataset_whose_shards_fail_the_check_is_not_left_prepared(tmp_path, monkeypatch):
  """The builder writes dataset_info.json before the shards are checked: a failed
  check must not leave a dataset that `is_prepared` accepts."""
  from gta_jax.data import builders

  class Builder:
    prepared_dir = str(tmp_path / "dataset" / "1.0.0")

    def download_and_prepare(self):
      os.makedirs(self.prepared_dir)
      open(os.path.join(self.prepared_dir, pipeline.INFO_FILE), "w").close()

    def write_report(self):
      pass

  def check_shards(path):
    assert pipeline.is_prepared(path)
    raise pipeline.CorruptDataError(f"shard {path}/x holds 1 records: it is truncated.")

  monkeypatch.setattr(builders, "make_builder", lambda *a, **k: Builder())
  monkeypatch.setattr(preparation, "check_shards", check_shards)
  with pytest.raises(pipeline.CorruptDataError, match="truncated.* Removed .*1.0.0"):
    preparation._build(tiny_config(tmp_path).data, num_workers=0)
  assert not pipeline.is_prepared(Builder.prepared_dir)
