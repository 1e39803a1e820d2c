"""SIGTERM (what clusters send before they pre-empt a job or at its time limit) turned into one
training step, the same on every process, at which the run saves a checkpoint and exits with
status 75 (EX_TEMPFAIL: try again), not 0: training is unfinished, and the launcher restarts it
(Kubernetes' podFailurePolicy, SLURM's requeue in `launch/`). Re-running resumes from that step.

Several processes (`jax.distributed`): JAX's pre-emption sync manager owns SIGTERM. Its notifier
catches the signal on any process, the coordination service tells the others, and together they
pick the first step none of them has reported yet. Every process reports every step through
`CheckpointManager.reached_preemption(step)` (JAX's `reached_preemption_sync_point`), and all get
True at that step. A flag of each process's own would let one process enter the checkpoint's
barrier while another waits in the next step's all-reduce. The handler JAX installed is left in
place (a Python handler would replace it). JAX's notifier looks for the signal once a second, so
the agreed step comes a second or two of training after it. A notice that arrives before a
process first reports its step (while it imports or joins the run) is counted from step 0 and
missed by a resumed run, which then trains on, saving at its usual interval, until it is
killed; as after `kill -9`, re-running resumes from its last checkpoint.

A single process without `jax.distributed` has no sync manager: a handler of our own records the
signal, installed only while training runs (before it, there is nothing to save, and SIGTERM
ends the process as usual), and the next step that asks stops there.
"""

from __future__ import annotations

import os
import signal

import jax
import orbax.checkpoint as ocp
from absl import logging

EXIT_STATUS = os.EX_TEMPFAIL  # 75: the status of a pre-empted run, which a re-run resumes.


class Preempted(Exception):
  """Training saved `step` after SIGTERM and stopped there, unfinished."""

  def __init__(self, step: int):
    super().__init__(f"pre-empted: saved step {step} after SIGTERM; re-run the same command to "
                     "resume")
    self.step = step


class StopSignal:
  """`reached(step)`: whether training should save `step` and stop; call it at every step.

  Create it with the step training resumes from as early as possible: JAX's protocol counts from
  the last step each process reported, so a notice that arrives while the data is still being
  built then lands on the first step trained. `listen()` when the loop starts, `close()` after.
  """

  def __init__(self, manager: ocp.CheckpointManager, step: int):
    self._manager = manager
    self._agreed = jax.distributed.is_initialized()
    self._requested = False
    self._previous = None
    if self._agreed:
      if not jax.config.jax_enable_preemption_service:
        logging.warning("jax_enable_preemption_service is off: SIGTERM will end this run "
                        "without a checkpoint.")
      self._manager.reached_preemption(step)

  def listen(self) -> None:
    """Starts handling SIGTERM, for a single process; call when training starts."""
    if not self._agreed and self._previous is None:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def close(self) -> None:
    """Gives SIGTERM back to the handler it had before `listen`."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step, then exiting.")
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._agreed:
      return self._manager.reached_preemption(step)
    return self._requested
