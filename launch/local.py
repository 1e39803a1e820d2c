"""Starts N processes of one command on this machine, as one multi-process JAX run.

  python launch/local.py --num_processes=2 -- \
      python -m dmjax.main --config=configs/r64.py --workdir=workdirs/r64_2proc

For testing multi-host code on one machine (add `--cpu_devices_per_process=2` to give each
process 2 CPU devices), and for multi-GPU boxes with one process per GPU (`--gpus_per_process=1`
sets CUDA_VISIBLE_DEVICES for each). Each process gets DMJAX_DISTRIBUTED=1 and its coordinator
address, process count and index in DMJAX_* variables (see dmjax/parallel.py). If one process
fails, the others are stopped and this launcher exits with the failing status. SIGTERM is passed
on to every process; pre-empted, they save one step together and each exits with status 75, which
this launcher then exits with too (re-run the same command to resume).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

PREEMPTED = 75  # dmjax.preemption.EXIT_STATUS: saved after SIGTERM; the others are saving too.


def reserve_port() -> socket.socket:
  """A socket bound to a free localhost port, held until the run ends.

  Closing it before the coordinator binds the port would let another program take the port in
  between. The coordinator (gRPC) binds with SO_REUSEPORT, as this socket does, so it can bind
  beside it; a socket that never listens receives no connections, and other programs, which
  bind without SO_REUSEPORT or ask the system for any free port, are kept off the port.
  """
  s = socket.socket()
  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  s.bind(("localhost", 0))
  return s


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--cpu_devices_per_process", type=int, default=0,
                      help="Run on CPU with this many devices per process (0: leave as is).")
  parser.add_argument("--gpus_per_process", type=int, default=0,
                      help="Give process i GPUs i*k .. i*k+k-1 via CUDA_VISIBLE_DEVICES.")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given after --")

  reservation = reserve_port()
  address = f"localhost:{reservation.getsockname()[1]}"
  processes = []
  for index in range(args.num_processes):
    env = dict(os.environ, DMJAX_DISTRIBUTED="1", DMJAX_COORDINATOR_ADDRESS=address,
               DMJAX_NUM_PROCESSES=str(args.num_processes), DMJAX_PROCESS_ID=str(index))
    if args.cpu_devices_per_process:
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                          f"{args.cpu_devices_per_process}").strip()
    if args.gpus_per_process:
      first = index * args.gpus_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(
          str(first + k) for k in range(args.gpus_per_process))
    processes.append(subprocess.Popen(command, env=env))

  def stop_all(signum, frame):
    del frame
    for p in processes:
      p.send_signal(signum)

  signal.signal(signal.SIGTERM, stop_all)  # Pre-emption reaches every process.
  status = 0
  while processes:
    for p in list(processes):
      code = p.poll()
      if code is None:
        continue
      processes.remove(p)
      if code != 0 and status in (0, PREEMPTED):
        status = code
        if code == PREEMPTED:
          continue  # The others have saved the same step and are exiting too.
        print(f"launch/local.py: process {p.pid} exited with {code}; stopping the others",
              file=sys.stderr)
        for other in processes:
          # Not SIGTERM: that asks the processes to agree on a step and save it together, which
          # a run that has lost one cannot do.
          other.kill()
    time.sleep(0.2)
  reservation.close()
  return status


if __name__ == "__main__":
  sys.exit(main())
