"""A bucket that fails requests (tests/gcs_emulator.py's faults) and the retries of
`gta_jax.retries`, in this process: files through `paths` (gcsfs) and an orbax
checkpoint (tensorstore's arrays, gcsfs's metadata) survive 20% failed requests,
each retry is counted, and without retries the same faults break them. A whole
train + SIGKILL + resume + eval run under faults: test_train_e2e.py's bucket test.
"""

import collections

import numpy as np
import orbax.checkpoint as ocp
import pytest

from gta_jax import paths
from gta_jax import retries

FAULTS = dict(error_rate=0.1, drop_rate=0.1, seed=7)
QUICK = retries.Policy(attempts=8, initial_s=0.01, max_s=0.1)
TREE = {"kernel": np.arange(30000, dtype=np.float32).reshape(100, 300),
        "bias": np.linspace(-1, 1, 300, dtype=np.float32)}


@pytest.fixture
def policy():
  """Sets the retry policy for the test: `policy(attempts=...)`, the rest QUICK's."""
  retries.install()
  before = retries.POLICY
  yield lambda **kw: retries.configure(retries.Policy(**dict(vars(QUICK), **kw)))
  retries.configure(before)


def write_read_and_checkpoint(root: str) -> None:
  """Some small files through `paths`, and an orbax save and restore."""
  for i in range(20):
    f = paths.path(f"{root}/files/{i}.txt")
    f.write_text(f"file {i} " * 500)
    assert f.read_text() == f"file {i} " * 500
  assert len(list(paths.path(f"{root}/files").iterdir())) == 20
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(paths.path(f"{root}/ckpt"), TREE)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(paths.path(f"{root}/ckpt"))
  for key, value in TREE.items():
    np.testing.assert_array_equal(restored[key], value)


def test_files_and_checkpoints_survive_failed_requests(bucket, policy):
  policy()
  before = retries.counts()
  with bucket.faulty(**FAULTS) as faults:
    write_read_and_checkpoint("gs://bucket/flaky")
  retried = collections.Counter(retries.counts())
  retried.subtract(before)
  failed = collections.Counter()
  for (client, _), n in faults.by_client.items():
    failed[client] += n
  print(f"faults {dict(faults.counts)} by client {dict(faults.by_client)}; "
        f"retried {dict(retried)}")
  assert faults.faulted > 0.15 * faults.counts["requests"] > 10
  assert failed["python-gcsfs"] > 10 and failed["tensorstore"] > 0
  # Every failed request is retried once, but for a few that gcsfs starts and then
  # abandons (a folder check racing a file check).
  gcsfs = sum(n for k, n in retried.items() if k.startswith("gcsfs_"))
  assert 0.7 * failed["python-gcsfs"] <= gcsfs <= failed["python-gcsfs"]
  assert retried["gcsfs_429"] and retried["gcsfs_503"] and (
      retried["gcsfs_ClientPayloadError"] + retried["gcsfs_ServerDisconnectedError"])
  assert 0 < retried["tensorstore"] <= failed["tensorstore"]


def test_without_retries_failed_requests_break_them(bucket, policy):
  """The counter-test: one try per request (gcsfs's own retries gone too)."""
  policy(attempts=1)
  with bucket.faulty(**FAULTS):
    with pytest.raises(Exception):  # whichever layer meets a fault first
      write_read_and_checkpoint("gs://bucket/no_retries")
