"""The workdir lease (gta_jax/training/lease.py), locally and in a bucket (the GCS
emulator, which answers `ifGenerationMatch` as GCS does), and train.py's use of it."""

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

import gcs_emulator
from gta_jax import paths
from gta_jax.training import lease as lease_lib
from test_train_e2e import command, environment

HOLD = ("import sys, time\n"
        "from gta_jax.training import lease\n"
        "lease.Lease(sys.argv[1], timeout_s=float(sys.argv[2])).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.serve("leases") as served:
    yield served


@pytest.fixture(params=["local", "bucket"])
def workdir(request, tmp_path, monkeypatch):
  """A fresh workdir, local or `gs://leases/...` (the emulator's environment set)."""
  if request.param == "local":
    return str(tmp_path / "run")
  served = request.getfixturevalue("emulator")
  for key, value in served.env.items():
    monkeypatch.setenv(key, value)
  return f"gs://leases/{tmp_path.name}"


def hold(workdir, timeout_s=300.0, env=None):
  """A process holding the lease of `workdir`, once it says so."""
  process = subprocess.Popen([sys.executable, "-c", HOLD, workdir, str(timeout_s)],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, **(env or {})))
  assert process.stdout.readline().strip() == "held"
  return process


def write_lease(workdir, **fields):
  """Plants a lease of another holder (its fields overridden)."""
  holder = lease_lib.Holder.me(timeout_s=300.0)
  holder = lease_lib.Holder(**dict(holder.__dict__, **fields))
  lease = lease_lib.Lease(workdir)
  assert lease._store.create(holder.encode())  # pylint: disable=protected-access
  return holder


def read_lease(workdir):
  """The holder of the lease of `workdir` (None if there is no lease)."""
  current = lease_lib.Lease(workdir)._store.read()  # pylint: disable=protected-access
  return None if current is None else current[0]


def test_a_live_holder_refuses_a_second_run_until_released(workdir):
  first = lease_lib.Lease(workdir).acquire()
  with pytest.raises(lease_lib.WorkdirLeasedError) as refused:
    lease_lib.Lease(workdir).acquire()
  message = str(refused.value)
  holder = first.holder
  assert f"host {holder.host}, process {holder.pid}, started " in message
  assert time.strftime("%Y-%m-%d", time.gmtime(holder.started)) in message
  first.release()
  assert read_lease(workdir) is None
  lease_lib.Lease(workdir).acquire().release()


def test_a_killed_holder_is_taken_over_with_a_warning(workdir, caplog):
  holder = hold(workdir)
  assert read_lease(workdir).pid == holder.pid
  with pytest.raises(lease_lib.WorkdirLeasedError):
    lease_lib.Lease(workdir).acquire()
  holder.kill()
  holder.wait()
  with caplog.at_level(logging.WARNING):
    lease = lease_lib.Lease(workdir).acquire()
  assert f"process {holder.pid}" in caplog.text and "is gone" in caplog.text
  assert read_lease(workdir).pid == os.getpid()
  lease.release()


@pytest.mark.parametrize("age,taken_over", [(10.0, False), (1000.0, True)])
def test_a_holder_on_another_host_is_dead_when_its_heartbeat_is_old(workdir, age,
                                                                    taken_over):
  write_lease(workdir, host="elsewhere", pid=1, heartbeat=time.time() - age)
  if not taken_over:
    with pytest.raises(lease_lib.WorkdirLeasedError, match="host elsewhere, process 1"):
      lease_lib.Lease(workdir, timeout_s=300).acquire()
    return
  lease = lease_lib.Lease(workdir, timeout_s=300).acquire()
  assert read_lease(workdir).host != "elsewhere"
  lease.release()


@pytest.mark.parametrize("holder_timeout_s,taken_over", [(3600.0, False), (None, True)])
def test_a_holder_is_judged_by_the_longer_of_the_two_timeouts(workdir, holder_timeout_s,
                                                              taken_over):
  """A holder that beats every 360 s (lease_timeout_s=3600), silent for 1000 s, is
  alive to a contender with 300 s; a record without the holder's timeout (written
  before leases held it) is judged by the contender's."""
  fields = dict(host="elsewhere", pid=1, heartbeat=time.time() - 1000)
  if holder_timeout_s is None:
    holder = lease_lib.Holder(**dict(lease_lib.Holder.me(0.0).__dict__, **fields))
    old = {k: v for k, v in holder.__dict__.items() if k != "timeout_s"}
    assert lease_lib.Lease(workdir)._store.create(json.dumps(old).encode())  # pylint: disable=protected-access
  else:
    write_lease(workdir, timeout_s=holder_timeout_s, **fields)
  if not taken_over:
    with pytest.raises(lease_lib.WorkdirLeasedError, match="after 3600 s without"):
      lease_lib.Lease(workdir, timeout_s=300).acquire()
    return
  lease = lease_lib.Lease(workdir, timeout_s=300).acquire()
  assert read_lease(workdir).timeout_s == 300
  lease.release()


def test_of_runs_racing_for_a_stale_lease_exactly_one_wins(workdir):
  write_lease(workdir, host="elsewhere", pid=1, heartbeat=0.0)
  won, refused = [], []

  def contend():
    try:
      won.append(lease_lib.Lease(workdir).acquire())
    except lease_lib.WorkdirLeasedError:
      refused.append(1)

  threads = [threading.Thread(target=contend) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert (len(won), len(refused)) == (1, 5)
  assert read_lease(workdir).token == won[0].holder.token
  won[0].release()


def test_the_holder_renews_its_heartbeat(workdir):
  lease = lease_lib.Lease(workdir, timeout_s=0.5).acquire()
  started = read_lease(workdir).heartbeat
  time.sleep(0.5)
  assert read_lease(workdir).heartbeat > started
  # A contender with the same timeout sees a live holder.
  with pytest.raises(lease_lib.WorkdirLeasedError):
    lease_lib.Lease(workdir, timeout_s=0.5).acquire()
  lease.release()


def test_a_run_whose_lease_was_taken_over_stops_before_its_next_checkpoint(workdir):
  """Its heartbeat paused past the timeout, another run took the lease over: the
  training loop's check before each save raises, naming the workdir and the new
  holder, and leaves the new holder's lease alone."""
  from gta_jax.training import loop  # pylint: disable=g-import-not-at-top
  lease = lease_lib.Lease(workdir, timeout_s=0.5).acquire()
  loop.check_lease(lease)  # held: nothing to say
  store = lease_lib.Lease(workdir)._store  # pylint: disable=protected-access
  holder, version = store.read()
  other = dataclasses.replace(holder, host="elsewhere", pid=7, token="x")
  assert store.replace(version, other.encode())
  assert lease.lost.wait(5)
  with pytest.raises(lease_lib.LeaseLostError) as lost:
    loop.check_lease(lease)
  assert f"workdir {workdir}: " in str(lost.value)
  assert "held by host elsewhere, process 7" in str(lost.value)
  lease.release()
  assert read_lease(workdir).host == "elsewhere"


@pytest.mark.parametrize("content", [b'{"host": "a", "pi', b'{"owner": "me"}', b"[]"])
def test_a_damaged_lease_file_is_named(workdir, content):
  target = paths.path(workdir) / lease_lib.LEASE_FILE
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(content)
  with pytest.raises(lease_lib.LeaseFileError,
                     match=rf"lease file {workdir}/lease.json is damaged .*delete it"):
    lease_lib.Lease(workdir).acquire()


@pytest.mark.parametrize("content", [b'{"host": "a", "pi', b'{"owner": "me"}'])
def test_a_run_whose_lease_file_is_damaged_stops_before_its_next_checkpoint(
    workdir, content, caplog):
  """Nothing tells it any more whether another run writes to its workdir: it says so
  once, names the file, and leaves the file alone (it is not its lease)."""
  caplog.set_level(logging.WARNING)
  lease = lease_lib.Lease(workdir, timeout_s=0.5).acquire()
  target = paths.path(workdir) / lease_lib.LEASE_FILE
  store = lease._store  # pylint: disable=protected-access
  # Locally under the store's lock, so that no heartbeat is between its check and
  # its write; a bucket's heartbeat is conditional on the object's generation.
  with (contextlib.nullcontext() if workdir.startswith("gs://")
        else store._locked()):  # pylint: disable=protected-access
    target.write_bytes(content)
  assert lease.lost.wait(5)
  with pytest.raises(lease_lib.LeaseLostError,
                     match=rf"workdir {workdir}: the lease file {workdir}/lease.json is "
                     r"damaged \(\w+Error: .*This run stops before its next checkpoint"):
    lease.check()
  lease.release()
  assert target.read_bytes() == content
  assert [r.levelno for r in caplog.records if r.name == lease_lib.__name__] == [
      logging.ERROR]


def test_a_heartbeat_that_cannot_be_written_is_tried_again(workdir, monkeypatch,
                                                           caplog):
  caplog.set_level(logging.WARNING)
  lease = lease_lib.Lease(workdir, timeout_s=0.5).acquire()
  store = lease._store  # pylint: disable=protected-access
  replace, failed = store.replace, threading.Event()

  def unreachable_once(version, data):
    if not failed.is_set():
      failed.set()
      raise OSError("bucket not reachable")
    return replace(version, data)

  monkeypatch.setattr(store, "replace", unreachable_once)
  assert failed.wait(5)
  beaten = read_lease(workdir).heartbeat
  deadline = time.time() + 5
  while read_lease(workdir).heartbeat == beaten:
    assert time.time() < deadline, "no heartbeat after the failed one"
    time.sleep(0.05)
  lease.check()
  assert not lease.lost.is_set()
  assert (f"Could not renew the lease {lease.path} (bucket not reachable); trying "
          "again.") in caplog.text
  lease.release()
  assert read_lease(workdir) is None


def test_a_filesystem_without_hard_links_is_named(tmp_path, monkeypatch):
  def link(*unused_args):
    raise PermissionError(1, "Operation not permitted")

  monkeypatch.setattr(os, "link", link)
  workdir = tmp_path / "mounted"
  with pytest.raises(lease_lib.LeaseFileError,
                     match=rf"lease file {workdir}/lease.json as a hard link .*gs://"):
    lease_lib.Lease(workdir).acquire()
  assert os.listdir(workdir) == []  # no temporary file left


def test_a_failed_release_does_not_replace_the_runs_error(tmp_path, monkeypatch, caplog):
  lease = lease_lib.Lease(tmp_path / "run").acquire()

  def replace(*unused_args):
    raise OSError("disk gone")

  monkeypatch.setattr(lease._store, "replace", replace)  # pylint: disable=protected-access
  with pytest.raises(ZeroDivisionError), caplog.at_level(logging.WARNING):
    try:
      1 / 0  # the run's error
    finally:
      lease.release()
  assert f"Could not delete the lease {lease.path} (OSError: disk gone)" in caplog.text


@pytest.mark.slow
def test_train_py_is_refused_at_once_and_starts_over_a_killed_holder(tmp_path):
  """A second train.py on a live workdir stops within seconds naming the holder; once
  the holder is SIGKILLed, train.py takes the lease over (and here stops later, at
  a dataset that cannot be prepared)."""
  workdir = tmp_path / "run"
  holder = hold(str(workdir))
  argv = command("train.py", workdir, tmp_path / "data")
  begin = time.time()
  result = subprocess.run(argv, env=environment(), capture_output=True, text=True,
                          timeout=300, check=False)
  elapsed = time.time() - begin
  assert result.returncode == 1, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("train: WorkdirLeasedError: another run holds the workdir")
  assert f"process {holder.pid}, started " in line
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(workdir)) == ["lease.json"]  # nothing else written
  assert elapsed < 60, elapsed  # the time to start Python and JAX

  holder.kill()
  holder.wait()
  result = subprocess.run(argv + ["--config.data.dataset=ucf101"], env=environment(),
                          capture_output=True, text=True, timeout=300, check=False)
  assert f"Took over the lease {workdir}/lease.json" in result.stderr, result.stderr[-3000:]
  assert "is not prepared" in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(workdir / "lease.json")  # released on the way out
