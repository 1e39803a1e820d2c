"""The main job: `python -m dmjax.main --config=configs/r64.py --workdir=DIR` (or `dmjax-train`).

Re-running the same command resumes from the workdir's latest checkpoint. On several hosts, add
`--distributed` (see `dmjax.parallel.initialize` and `launch/`).

Exit status: 0 when training and the final evaluation are done; 75 (EX_TEMPFAIL) when SIGTERM
stopped it after saving a checkpoint (pre-emption, a time limit): re-run it to resume; 1 for a
mistake in the settings, data or workdir (one line says which), including a workdir that another
live run holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from dmjax import cli, parallel, preemption, progress, train


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file("config", None, "Training configuration file.", flag_values=f,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Where checkpoints and TensorBoard logs go.",
                      flag_values=f)
  flags.DEFINE_bool(
      "distributed", False, "Join a multi-process run (also: DMJAX_DISTRIBUTED=1); SLURM, Open "
      "MPI and Kubernetes are detected, or give the three flags below.", flag_values=f)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.", flag_values=f)
  flags.DEFINE_integer("num_processes", None, "Processes in the run.", flag_values=f)
  flags.DEFINE_integer("process_id", None, "This process's index, 0-based.", flag_values=f)
  flags.DEFINE_integer(
      "heartbeat_timeout_s", 60, "Seconds without a heartbeat after which a process counts as "
      "dead and the others fail instead of waiting for it.", flag_values=f)
  flags.DEFINE_integer(
      "initialization_timeout_s", 300, "Seconds the processes wait for each other to start and "
      "join; raise it where they start minutes apart (Kubernetes pods pulling their image).",
      flag_values=f)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=f)


def train_with_flags(f: flags.FlagValues) -> None:
  if parallel.distributed_requested(f.distributed):
    parallel.initialize(f.coordinator_address, f.num_processes, f.process_id,
                        initialization_timeout_s=f.initialization_timeout_s,
                        heartbeat_timeout_s=f.heartbeat_timeout_s)
    progress.device_banner()  # Only now: asking JAX for devices before joining breaks the join.
  logging.info("Config:\n%s", f.config)
  try:
    train.train_and_evaluate(f.config, f.workdir)
  except preemption.Preempted:
    # Not 0: the run is unfinished, and launchers restart what exits with this status.
    raise SystemExit(preemption.EXIT_STATUS) from None


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, train_with_flags, argv, program="dmjax-train",
          info_logs=True)


if __name__ == "__main__":
  main()
