"""Joining a multi-process JAX run (JAX's multi-controller runtime).

Every process runs the same command; `jax.distributed.initialize` connects them through a
coordinator so that `jax.devices()` spans all of them. It is only called when asked for, by
`--distributed` or DMJAX_DISTRIBUTED=1:

  * under SLURM (`srun`), Open MPI (`mpirun`) or Kubernetes (an Indexed Job; needs the `k8s`
    extra of jax), JAX reads the coordinator, process count and index from the environment;
  * otherwise give them explicitly: `--coordinator_address=HOST:PORT --num_processes=N
    --process_id=I` (or DMJAX_COORDINATOR_ADDRESS, DMJAX_NUM_PROCESSES, DMJAX_PROCESS_ID, which
    `launch/local.py` sets).

A process that dies stops sending heartbeats; after `heartbeat_timeout_s` the coordination
service fails the others instead of leaving them blocked in a collective. Joining also installs
JAX's SIGTERM handler, through which the processes agree on the step at which to save and stop
when pre-empted (`dmjax/preemption.py`); nothing here replaces it.
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV_PREFIX = "DMJAX_"


def requested(flag: bool) -> bool:
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
