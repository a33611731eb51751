"""Data parallelism over every device of every process.

One `jax.sharding.Mesh` spans all devices with a single axis, `data`. The train
state is replicated, each batch is split along its first axis, and `jax.jit`
(GSPMD) inserts the gradient all-reduce. BatchNorm statistics are computed over
the *global* batch: under `jit` the mean and variance of a sharded batch are
reduced across devices, so the result does not depend on the device count.

In a multi-process run every process reads its own slice of the batch and
:func:`shard_batch` assembles the global array with
`jax.make_array_from_process_local_data`.
"""

import os
from typing import Any, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def _cluster_detected() -> bool:
  """True under a multi-process launcher that `jax.distributed` auto-detects."""
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(var, "1") or 1) > 1:
      return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: str = "",
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts `jax.distributed` when the run spans several processes.

  With a `coordinator_address` ('host:port') the process count and id must be
  given too (plain clusters, or several processes on one machine). Without one,
  multi-host TPU VMs, SLURM and Open MPI launches are detected from their
  environment and JAX finds the coordinator itself; a single process does nothing.
  CPU collectives use gloo.

  Raises:
    ValueError: a coordinator address without the process count and id.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes, axis `data`."""
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, key: str = "config.batch_size") -> None:
  """The global batch must split evenly over devices and processes."""
  devices, processes = jax.device_count(), jax.process_count()
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % devices:
    raise ValueError(f"{key}={batch_size!r} must be a positive multiple of the "
                     f"device count ({devices} devices in {processes} processes)")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Assembles global arrays, split along axis 0, from each process's local slice."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (identical on every process) on all devices."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)
