"""The grain pipeline on a tiny `synthetic_motion`: shapes, resume, sharding, eval coverage."""

import os

import numpy as np
import pytest

from gta_jax import config_lib
from gta_jax.data import pipeline
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
  meta = pipeline.prepare_dataset(tiny_config(d))
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
  meta = pipeline.prepare_dataset(c)  # prepared: a no-op
  assert meta.name == "synthetic_motion" and meta.num_classes == 10
  assert meta.class_names[:2] == ("moving_right", "moving_left")


def test_num_classes_mismatch_names_both(data_dir):
  c = tiny_config(data_dir)
  c.model.num_classes = 174
  with pytest.raises(ValueError, match=r"174.*10 classes"):
    pipeline.prepare_dataset(c)


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


def test_train_same_crop_and_flip_on_every_frame():
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
  clip = np.repeat(frame[None], 8, axis=0)
  outs = set()
  for seed in range(40):
    out = transforms.train_transform(clip, 32, (1.0, 0.875, 0.75, 0.66), True,
                                     np.random.default_rng(seed))
    assert out.shape == (8, 32, 32, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[0], f) for f in out[1:])  # one crop/flip per clip
    outs.add(out[0].tobytes())
  assert len(outs) > 10  # the crops and flips do vary between clips


def test_flip_happens_only_when_enabled():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
  flipped = [transforms.train_transform(clip, 32, (1.0,), True, np.random.default_rng(s))
             for s in range(20)]
  assert any(np.array_equal(f, clip[:, :, ::-1]) for f in flipped)
  assert any(np.array_equal(f, clip) for f in flipped)
  for s in range(20):
    out = transforms.train_transform(clip, 32, (1.0,), False, np.random.default_rng(s))
    np.testing.assert_array_equal(out, clip)


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


def test_concurrent_preparation_is_race_free(tmp_path, monkeypatch):
  import socket
  import threading
  from gta_jax.data import builders
  c = tiny_config(tmp_path)
  c.data.synthetic.train_per_class = c.data.synthetic.val_per_class = 1
  calls = []
  real = builders.make_builder
  monkeypatch.setattr(builders, "make_builder",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  # A lock left by a dead process on this host is cleared, not waited on forever.
  path = builders.prepared_dir(c.data)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as f:
    f.write(f"{socket.gethostname()} 999999999")
  results, start = [], threading.Barrier(3)

  def worker():
    start.wait()
    results.append(pipeline.prepare_dataset(c))

  threads = [threading.Thread(target=worker) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert len(results) == 3 and all(r == results[0] for r in results)
  assert len(calls) == 1  # one preparer, the others waited for it
  assert not os.path.exists(path + ".lock")
