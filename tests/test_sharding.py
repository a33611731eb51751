"""When the CLIs start jax.distributed (JAX's own cluster detection), eval batches,
the prefetch of batches to the devices and the input pipeline's default parallelism.

Each cluster's environment is faked (variables, and the Cloud TPU metadata server);
`jax.distributed.initialize` itself is replaced, so no service starts.
"""

import jax
import numpy as np
import pytest
from jax._src.clusters import cloud_tpu_cluster

from gta_jax import config_lib
from gta_jax.data import pipeline
from gta_jax.training import sharding

CLUSTER_VARIABLES = (
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
    "SLURM_LOCALID", "SLURM_STEP_ID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY", "MEGASCALE_NUM_SLICES",
    "KUBERNETES_SERVICE_HOST")

SLURM_STEP = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2",
                  SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_ID="0")
OPEN_MPI = dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.0.0.1:34911",
                OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="1",
                OMPI_COMM_WORLD_LOCAL_RANK="1")


def fake_metadata(workers):
  """A Cloud TPU VM metadata server for a slice of `workers` hosts."""
  values = {"agent-worker-number": "0", "worker-network-endpoints": ",".join(workers),
            "tpu-env": ""}
  return lambda key: (values[key], 200)


@pytest.fixture
def cluster(monkeypatch):
  """A clean environment (no cluster); returns a function that sets one up."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)

  def set_up(variables=(), tpu_vm=False, metadata=None):
    for name, value in dict(variables).items():
      monkeypatch.setenv(name, value)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", tpu_vm)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                        metadata or (lambda key: ("", 404)))

  set_up()
  return set_up


def detected(cluster_setup, **kwargs):
  cluster_setup(**kwargs)
  found = sharding.detect_cluster()
  return found and found.__name__


def test_no_cluster(cluster):
  assert detected(cluster) is None


def test_slurm_inside_an_srun_step(cluster):
  assert detected(cluster, variables=SLURM_STEP) == "SlurmCluster"


@pytest.mark.parametrize("step_id", [None, "4294967290", "4294967291"],
                         ids=["salloc_shell", "interactive_step", "batch_script"])
def test_slurm_outside_a_job_step_is_one_process(cluster, step_id):
  variables = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
  if step_id is not None:
    variables["SLURM_STEP_ID"] = step_id
  assert detected(cluster, variables=variables) is None


def test_slurm_step_of_one_task_is_one_process(cluster):
  assert detected(cluster, variables=dict(SLURM_STEP, SLURM_NTASKS="1")) is None


def test_open_mpi(cluster):
  assert detected(cluster, variables=OPEN_MPI) == "OmpiCluster"


def test_cloud_tpu_pod_slice_through_the_metadata_server(cluster):
  """TPU_WORKER_HOSTNAMES is unset on a Cloud TPU VM: JAX asks the metadata server."""
  assert detected(cluster, tpu_vm=True,
                  metadata=fake_metadata(["10.0.0.2", "10.0.0.3"])) == "GceTpuCluster"


def test_single_host_cloud_tpu_vm_is_one_process(cluster):
  assert detected(cluster, tpu_vm=True, metadata=fake_metadata(["10.0.0.2"])) is None


def test_gke_tpu_slice(cluster):
  assert detected(cluster, tpu_vm=True,
                  variables=dict(TPU_PROCESS_ADDRESSES="h0:8476,h1:8476,h2:8476,h3:8476",
                                 TPU_WORKER_ID="2")) == "GkeTpuCluster"


def test_tpu_variables_off_a_tpu_vm_are_ignored(cluster):
  assert detected(cluster, variables=dict(TPU_WORKER_HOSTNAMES="a,b")) is None


@pytest.fixture
def initialize_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  return calls


def test_a_detected_cluster_starts_jax_distributed_with_its_method(cluster,
                                                                   initialize_calls):
  cluster(variables=SLURM_STEP)
  sharding.initialize_distributed()
  assert initialize_calls == [((), {"cluster_detection_method": "slurm"})]


def test_single_process_flag_skips_the_detection(cluster, initialize_calls):
  cluster(variables=SLURM_STEP)
  sharding.initialize_distributed(single_process=True)
  assert not initialize_calls


def test_explicit_coordinator(cluster, initialize_calls):
  sharding.initialize_distributed("10.0.0.1:1234", 2, 1)
  assert initialize_calls == [(("10.0.0.1:1234", 2, 1), {})]
  with pytest.raises(ValueError, match="--single_process"):
    sharding.initialize_distributed("10.0.0.1:1234", 2, 1, single_process=True)


@pytest.mark.parametrize("batch,devices,want", [(32, 3, 33), (32, 1, 32), (4, 8, 8),
                                                (10, 4, 8), (6, 4, 8)])
def test_eval_batch_is_rounded_to_the_device_count(batch, devices, want, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: devices)
  assert sharding.round_eval_batch_size(batch) == want


def test_training_batch_keeps_its_error(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  with pytest.raises(ValueError, match="config.batch_size=32 must be a positive multiple"):
    sharding.check_batch_size(32, "config.batch_size")


class CountingBatches:
  """Batches 0, 1, 2, ... with a position state, like `pipeline.BatchIterator`."""

  def __init__(self):
    self.next = 0

  def __next__(self):
    batch = {"x": np.full((2, 3), self.next, np.float32)}
    self.next += 1
    return batch

  def get_state(self):
    return self.next

  def set_state(self, state):
    self.next = state


def test_device_prefetcher_reads_ahead_but_saves_the_position_handed_out():
  batches = CountingBatches()
  prefetcher = sharding.DevicePrefetcher(batches, sharding.make_mesh(), size=2)
  first = next(prefetcher)
  assert isinstance(first["x"], jax.Array) and float(first["x"][0, 0]) == 0
  assert batches.next == 3  # two batches wait on the devices
  assert prefetcher.get_state() == 1  # the next batch the step has not seen
  prefetcher.set_state(prefetcher.get_state())
  assert [float(next(prefetcher)["x"][0, 0]) for _ in range(3)] == [1, 2, 3]


def test_device_prefetcher_ends_with_its_input():
  out = list(sharding.DevicePrefetcher(iter([{"x": np.zeros(2)}] * 3),
                                       sharding.make_mesh()))
  assert len(out) == 3


@pytest.mark.parametrize("workers,threads,want", [(-1, -1, (8, 1)), (0, -1, (0, 8)),
                                                  (2, -1, (2, 4)), (3, 5, (3, 5))])
def test_input_workers_and_threads_default_to_the_host_cores(workers, threads, want,
                                                             monkeypatch):
  monkeypatch.setattr(pipeline, "host_cores", lambda: 8)
  d = config_lib.base_config().data
  d.num_workers, d.read_threads = workers, threads
  assert (pipeline.worker_count(d), pipeline.read_thread_count(d)) == want
