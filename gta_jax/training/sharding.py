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

import collections
import os
from typing import Any, Iterator, Optional, Type

import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


# Slurm step ids at and above this are the batch script, the interactive shell of
# `salloc` and other special steps, not tasks started by `srun`.
_SLURM_SPECIAL_STEPS = 0xFFFFFFF0


def _inside_slurm_step() -> bool:
  step = os.environ.get("SLURM_STEP_ID", "")
  return step.isdigit() and int(step) < _SLURM_SPECIAL_STEPS


def detect_cluster() -> Optional[Type[Any]]:
  """The cluster that `jax.distributed.initialize()` would find, if it spans processes.

  Asks JAX's own detection (`jax._src.clusters`: Cloud TPU VMs through their metadata
  server, GKE, SLURM, Open MPI, Kubernetes), in JAX's order, skipping the opt-in
  methods. SLURM counts only inside a job step (`srun`): the variables an `salloc`
  shell or a batch script leave behind describe the allocation, not this process.

  Returns:
    The `ClusterEnv` class, or None when there is none or it holds one process.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method or not env.is_env_present():
      continue
    if env.name == "slurm" and not _inside_slurm_step():
      continue
    return env if env.get_process_count() > 1 else None
  return None


def initialize_distributed(coordinator_address: str = "",
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           single_process: bool = False) -> None:
  """Starts `jax.distributed` when the run spans several processes.

  With a `coordinator_address` ('host:port') the process count and id must be
  given too (plain clusters, or several processes on one machine). Without one,
  :func:`detect_cluster` decides, and JAX finds the coordinator itself;
  `single_process` (the CLIs' `--single_process`) skips the detection. CPU
  collectives use gloo.

  Raises:
    ValueError: a coordinator address without the process count and id, or with
      `single_process`.
  """
  if coordinator_address:
    if single_process:
      raise ValueError("--single_process contradicts --coordinator_address")
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  cluster = None if single_process else detect_cluster()
  if cluster is not None:
    logging.info("%s cluster detected: starting jax.distributed", cluster.__name__)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster_detection_method=cluster.name or None)


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes, axis `data`."""
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """A mesh of this process's first device, axis `data`: inference on one host
  (`predict`, `export`), whatever the process count."""
  return Mesh(np.array(jax.local_devices()[:1]), (DATA_AXIS,))


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


def round_eval_batch_size(batch_size: int, key: str = "config.eval.batch_size") -> int:
  """`batch_size` rounded to the nearest positive multiple of the device count.

  Evaluation pads its last batch anyway, so (unlike the training batch) a size that
  does not divide over the devices is adjusted, with a warning, rather than refused.

  Raises:
    ValueError: not a positive int.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"{key} must be a positive int, got {batch_size!r}")
  devices = jax.device_count()
  rounded = max(devices, round(batch_size / devices) * devices)
  if rounded != batch_size:
    logging.warning("%s=%d does not divide over %d devices: using %d", key, batch_size,
                    devices, rounded)
  return rounded


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Assembles global arrays, split along axis 0, from each process's local slice.

  Leaves that are already `jax.Array`s (clips decoded on the devices by DALI) pass
  through.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.Array) else
      jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (identical on every process) on all devices."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


class DevicePrefetcher:
  """Hands out the batches of `batches` sharded on the devices, `size` of them ahead.

  `jax.make_array_from_process_local_data` starts the host-to-device copies without
  waiting for them, so the next `size` batches travel while the current step runs.
  For an iterator with `get_state`/`set_state` (a `pipeline.BatchIterator`), so does
  this one, and its state is the position of the next batch handed out (not of the
  next one read ahead): a checkpoint resumes at the batch the model has not seen.
  """

  def __init__(self, batches: Iterator[Any], mesh: Mesh, size: int = 2):
    self._batches = batches
    self._mesh = mesh
    self._size = size
    self._ahead = collections.deque()  # (state before the batch, sharded batch)

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def _state(self) -> Any:
    return self._batches.get_state() if hasattr(self._batches, "get_state") else None

  def __next__(self) -> Any:
    while len(self._ahead) <= self._size:
      state = self._state()
      try:
        batch = next(self._batches)
      except StopIteration:
        break
      self._ahead.append((state, shard_batch(batch, self._mesh)))
    if not self._ahead:
      raise StopIteration
    return self._ahead.popleft()[1]

  def get_state(self) -> Any:
    return self._ahead[0][0] if self._ahead else self._state()

  def set_state(self, state: Any) -> None:
    self._ahead.clear()
    self._batches.set_state(state)

  def close(self) -> None:
    self._ahead.clear()
    if hasattr(self._batches, "close"):
      self._batches.close()
