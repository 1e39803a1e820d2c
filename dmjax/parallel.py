"""Data parallelism over every device of every process: the mesh, shardings, global batches,
prefetching to the devices, and joining a multi-process run.

Each process's pipeline makes its share of every global batch (host-local); `to_global` turns the
shares into one array sharded along the mesh's batch axis, so the same jitted step runs on one
CPU or many hosts.

Joining a multi-process run (JAX's multi-controller runtime): every process runs the same
command; `jax.distributed.initialize` connects them through a coordinator so that `jax.devices()`
spans all of them. It is only called when asked for, by `--distributed` or DMJAX_DISTRIBUTED=1:

  * under SLURM (`srun`), Open MPI (`mpirun`) or Kubernetes (an Indexed Job; needs the `k8s`
    extra of jax), JAX reads the coordinator, process count and index from the environment;
  * otherwise give them explicitly: `--coordinator_address=HOST:PORT --num_processes=N
    --process_id=I` (or DMJAX_COORDINATOR_ADDRESS, DMJAX_NUM_PROCESSES, DMJAX_PROCESS_ID, which
    `launch/local.py` sets).

A process that dies stops sending heartbeats; after `heartbeat_timeout_s` the coordination
service fails the others instead of leaving them blocked in a collective. Joining also installs
JAX's SIGTERM handler, through which the processes agree on the step at which to save and stop
when pre-empted (`dmjax.preemption`); nothing here replaces it.
"""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def create_mesh() -> Mesh:
  """A one-axis mesh over every device of every process: data parallelism.

  The axis is `Auto`: batches are sharded along it and XLA propagates the sharding through the
  model (recent JAX defaults to `Explicit`, which would ask every reshape for its sharding).
  """
  return jax.make_mesh((jax.device_count(),), (BATCH_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's part of a batch into one array sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def local_copy(tree):
  """This process's copy of replicated global arrays, as numpy: it can be used without
  collectives, by one process alone."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class DevicePrefetcher:
  """Keeps the next `size` batches of a host iterator on their way to the devices, so that the
  transfer of one overlaps the steps before it.

  `get_state()` is the host iterator's state after the last batch handed out, not after the
  ones waiting here: a checkpoint resumes with the first batch its steps have not seen.
  """

  def __init__(self, iterator, sharding, size: int = 2):
    self._iterator = iterator
    self._sharding = sharding
    self._size = size
    self._queue = collections.deque()
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) <= self._size:
      batch = to_global(next(self._iterator), self._sharding)
      self._queue.append((batch, self._iterator.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self):
    return self._state


ENV_PREFIX = "DMJAX_"


def distributed_requested(flag: bool) -> bool:
  return flag or os.environ.get(ENV_PREFIX + "DISTRIBUTED", "") not in ("", "0")


def _from_env(name: str, value, cast=str):
  if value is None and os.environ.get(ENV_PREFIX + name):
    return cast(os.environ[ENV_PREFIX + name])
  return value


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, init_timeout_s: int = 300,
               heartbeat_timeout_s: int = 60) -> None:
  """Joins the run; arguments left None come from DMJAX_* variables or cluster detection."""
  coordinator_address = _from_env("COORDINATOR_ADDRESS", coordinator_address)
  num_processes = _from_env("NUM_PROCESSES", num_processes, int)
  process_id = _from_env("PROCESS_ID", process_id, int)
  # Collectives between CPU devices of different processes need an implementation; gloo ships
  # with jaxlib. (It only concerns the CPU backend, so GPU runs are unaffected.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=init_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
