"""The main job: `python -m dmjax.main --config=configs/r64.py --workdir=DIR`.

Re-running the same command resumes from the workdir's latest checkpoint. On several hosts, add
`--distributed` (see `dmjax/distributed.py` and `launch/`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dmjax import distributed, errors, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and TensorBoard logs go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run (also: DMJAX_DISTRIBUTED=1); SLURM, Open "
    "MPI and Kubernetes are detected, or give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 60, "Seconds without a heartbeat after which a process counts as "
    "dead and the others fail instead of waiting for it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if distributed.requested(_DISTRIBUTED.value):
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)
  logging.info("Config:\n%s", _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (errors.UserError, FileNotFoundError, train.NonFiniteLossError) as e:
    # Bad settings or files and diverged runs are the user's to fix: one line, not a traceback.
    # Anything else is a bug, and keeps its traceback.
    logging.debug("Traceback:", exc_info=True)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
