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

Which GPUs a process uses is chosen here (`local_device_ids`), not left to JAX's SLURM and Open
MPI detection, which assumes every process sees every GPU of its host. The processes wait
`initialization_timeout_s` for each other to start.

A process that dies stops sending heartbeats; after `heartbeat_timeout_s` the coordination
service fails the others instead of leaving them blocked in a collective. Joining also installs
JAX's SIGTERM handler, through which the processes agree on the step at which to save and stop
when pre-empted (`dmjax.preemption`); nothing here replaces it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dmjax import errors

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


def local_device_copy(tree):
  """This process's copy of replicated global arrays where it already is, on one of its own
  devices: a program over it runs on that device alone (no collectives, so one process may run
  it) and nothing crosses to the host."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


class DevicePrefetcher:
  """Keeps `size` batches of a host iterator on the devices: the one handed out last (its step
  may still run) and the next `size - 1` on their way, so that the transfer of one overlaps the
  steps before it. Each batch costs device memory; `size` bounds how many there are at once.

  `get_state()` is the host iterator's state after the last batch handed out, not after the
  ones waiting here: a checkpoint resumes with the first batch its steps have not seen.
  """

  def __init__(self, iterator, sharding, size: int = 2):
    if size < 1:
      raise ValueError(f"DevicePrefetcher size={size}: expected at least 1")
    self._iterator = iterator
    self._sharding = sharding
    self._size = size
    self._queue = collections.deque()
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    # The batch handed out last counts until this call: its step was dispatched before it.
    while len(self._queue) < self._size:
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


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
  """SLURM's count of this step's tasks on this node: SLURM_STEP_TASKS_PER_NODE lists them per
  node in run-length form ('8(x2)', '2,1'), indexed by SLURM_NODEID."""
  listing = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if not listing:
    return None
  counts = []
  for part in listing.split(","):
    count, _, repeat = part.partition("(x")
    counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
  node = int(env.get("SLURM_NODEID", 0))
  return counts[node] if node < len(counts) else None


def _local_rank_and_size(env: Mapping[str, str]) -> tuple[int, int | None] | None:
  """(index of this process among those a cluster launcher started on this host, how many it
  started there, None if unknown); None without such a launcher."""
  if "SLURM_LOCALID" in env and "SLURM_PROCID" in env:
    return int(env["SLURM_LOCALID"]), _tasks_on_this_node(env)
  if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
    size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    return int(env["OMPI_COMM_WORLD_LOCAL_RANK"]), int(size) if size else None
  return None


def _visible_gpu_count(env: Mapping[str, str]) -> int | None:
  """How many GPUs this process can see, when its environment says."""
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    visible = visible.strip()
    # SLURM writes NoDevFiles when the job has GPUs of another kind or none.
    return 0 if visible in ("", "NoDevFiles", "-1") else len(visible.split(","))
  on_node = env.get("SLURM_GPUS_ON_NODE")
  return int(on_node) if on_node and on_node.isdigit() else None


def _gpus_per_task(env: Mapping[str, str]) -> int | None:
  value = env.get("SLURM_GPUS_PER_TASK", "")  # '2' or 'a100:2'.
  count = value.rpartition(":")[2]
  return int(count) if count.isdigit() else None


def local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """The GPUs this process uses, as CUDA ordinals among those it sees (0 is the first entry of
  CUDA_VISIBLE_DEVICES, whatever GPU that is); [] for all it sees; None when no cluster launcher
  started several processes per host (or JAX_LOCAL_DEVICE_IDS says), which JAX handles itself.

  JAX's SLURM and Open MPI detection takes the process's local rank as its device: right when
  every task sees every GPU of its node, wrong when SLURM binds GPUs to tasks (--gpus-per-task:
  task 5 sees its one GPU as device 0, and asking for device 5 fails with "invalid device
  ordinal"). Here the choice follows what the process sees:

  * one GPU, as many as SLURM binds to each task (SLURM_GPUS_PER_TASK), or any number when it
    is the host's only process: all of them;
  * k GPUs per process on the host (every process sees all GPUs of the node, or of its share of
    it, CUDA_VISIBLE_DEVICES=2,3 for two processes): the local rank's k, counted from the first
    visible one;
  * a count the processes cannot share evenly: a one-line error.
  """
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  local = _local_rank_and_size(env)
  if local is None:
    return None
  rank, size = local
  count = _visible_gpu_count(env)
  if count is None:  # Nothing says how many: one per process, as JAX assumes, or all of them.
    return [] if size == 1 else [rank]
  if count in (0, 1, _gpus_per_task(env)) or size == 1:
    return list(range(count))
  if size is not None and count % size == 0:
    per_process = count // size
    return list(range(rank * per_process, (rank + 1) * per_process))
  if size is None and rank < count:
    return [rank]
  raise errors.UserError(
      f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r}: {count} GPUs for "
      f"{size if size is not None else 'an unknown number of'} processes on this host, which "
      "cannot share them evenly; bind GPUs to tasks (SLURM's --gpus-per-task), give each host a "
      "multiple of its processes' count, or set JAX_LOCAL_DEVICE_IDS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout_s: int = 300,
               heartbeat_timeout_s: int = 60) -> None:
  """Joins the run; arguments left None come from DMJAX_* variables or cluster detection.

  `initialization_timeout_s`: how long the processes wait for each other to start (Kubernetes
  pods may start minutes apart while their images are pulled).
  """
  coordinator_address = _from_env("COORDINATOR_ADDRESS", coordinator_address)
  num_processes = _from_env("NUM_PROCESSES", num_processes, int)
  process_id = _from_env("PROCESS_ID", process_id, int)
  # Collectives between CPU devices of different processes need an implementation; gloo ships
  # with jaxlib. (It only concerns the CPU backend, so GPU runs are unaffected.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids(os.environ),
      initialization_timeout=initialization_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
