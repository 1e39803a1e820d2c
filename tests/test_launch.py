"""Launching and re-launching runs as clusters do, on simulated cluster environments: which GPUs
each process takes under SLURM, the start-up timeout, the launchers' handling of a pre-empted
run's exit status, one run per workdir, and resuming the data at the same example."""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from conftest import REPO, copy_of, tiny_config
from jax._src import clusters

from dmjax import checkpoints, errors, parallel, preemption, train
from dmjax import config as config_lib


def load_launcher():
  spec = importlib.util.spec_from_file_location("local_launcher",
                                                os.path.join(REPO, "launch", "local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def slurm_env(local_id: int, tasks_per_node: str, visible: str | None, node_id: int = 0,
              **extra) -> dict[str, str]:
  """What srun gives a task of a job of 2 nodes (the variables JAX and dmjax read)."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": str(node_id * 8 + local_id), "SLURM_LOCALID": str(local_id),
         "SLURM_NODEID": str(node_id), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **extra}
  if visible is not None:
    env["CUDA_VISIBLE_DEVICES"] = visible
  return env


ALL_EIGHT = "0,1,2,3,4,5,6,7"


@pytest.mark.parametrize("env, expected", [
    # --gpus-per-task=1: SLURM binds one GPU to each task, which sees it as device 0.
    (slurm_env(5, "8(x2)", "5", node_id=1, SLURM_GPUS_PER_TASK="1"), [0]),
    (slurm_env(5, "8(x2)", "0", node_id=1), [0]),  # The same with cgroup-renumbered devices.
    # --gpus-per-node=8 (or --gpus-per-task without binding): every task sees all 8.
    (slurm_env(5, "8(x2)", ALL_EIGHT, node_id=1), [5]),
    (slurm_env(5, "8(x2)", ALL_EIGHT, SLURM_GPUS_PER_TASK="1"), [5]),
    # Part of a node: GPUs 2 and 3, shared by two tasks, bound one each, or given to one task.
    (slurm_env(0, "2(x2)", "2,3"), [0]),
    (slurm_env(1, "2(x2)", "2,3"), [1]),
    (slurm_env(1, "2(x2)", "3", SLURM_GPUS_PER_TASK="1"), [0]),
    (slurm_env(0, "1(x2)", "2,3"), [0, 1]),
    # Several GPUs per task: bound (--gpus-per-task=2, typed or not), or split from the node's.
    (slurm_env(3, "4(x2)", "6,7", SLURM_GPUS_PER_TASK="h100:2"), [0, 1]),
    (slurm_env(3, "4(x2)", ALL_EIGHT), [6, 7]),
    # Nodes with different task counts: this node (the second) runs one task.
    (slurm_env(0, "2,1", "0,1", node_id=1), [0, 1]),
    # No GPUs (a CPU partition), or a count nothing states: JAX's one per task.
    (slurm_env(5, "8(x2)", "NoDevFiles"), []),
    (slurm_env(5, "8(x2)", None), [5]),
    (slurm_env(0, "1(x2)", None), []),
    (slurm_env(1, "8", None, SLURM_GPUS_ON_NODE="8"), [1]),
    # Open MPI's mpirun, two ranks on a host of two GPUs.
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
      "CUDA_VISIBLE_DEVICES": "0,1"}, [1]),
    # No cluster launcher (launch/local.py sets CUDA_VISIBLE_DEVICES itself), or the user chose.
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, None),
    ({**slurm_env(5, "8(x2)", "5"), "JAX_LOCAL_DEVICE_IDS": "0"}, None),
])
def test_each_process_takes_the_gpus_that_slurm_gave_it(env, expected):
  assert parallel.local_device_ids(env) == expected


def test_gpus_that_cannot_be_shared_evenly_are_refused_in_one_line():
  with pytest.raises(errors.UserError, match=r"CUDA_VISIBLE_DEVICES='0,1,2': 3 GPUs for 2 "
                                             r"processes on this host"):
    parallel.local_device_ids(slurm_env(1, "2(x2)", "0,1,2"))


def use_env(monkeypatch, env: dict[str, str]) -> None:
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "DMJAX_", "JAX_LOCAL_DEVICE")) or name in (
        "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_ADDRESS"):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)


def test_jax_keeps_the_choice_where_its_own_slurm_detection_asks_for_a_gpu_it_cannot_see(
    monkeypatch):
  use_env(monkeypatch, slurm_env(5, "8(x2)", "5", node_id=1, SLURM_GPUS_PER_TASK="1"))
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  # JAX alone: CUDA device 5 for a task that sees one device ("invalid device ordinal").
  assert detect(None, None, None, None, None, 300)[1:] == (16, 13, [5])
  ours = parallel.local_device_ids(os.environ)
  assert detect(None, None, None, ours, None, 300)[3] == [0]


def test_initialize_passes_the_gpus_and_the_start_up_timeout_to_jax(monkeypatch):
  use_env(monkeypatch, slurm_env(5, "8(x2)", ALL_EIGHT))
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  parallel.initialize(initialization_timeout_s=900, heartbeat_timeout_s=30)
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                    "local_device_ids": [5], "initialization_timeout": 900,
                    "heartbeat_timeout_seconds": 30}]


@pytest.mark.slow
def test_the_start_up_timeout_is_a_flag(tmp_path):
  """Process 0 of 2 whose peer never comes gives up after --initialization_timeout_s."""
  port = load_launcher().reserve_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", DMJAX_DISTRIBUTED="1", DMJAX_NUM_PROCESSES="2",
             DMJAX_PROCESS_ID="0", DMJAX_COORDINATOR_ADDRESS=f"localhost:{port.getsockname()[1]}")
  started = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "dmjax.main", "--config=configs/r64.py", f"--workdir={tmp_path}",
       "--initialization_timeout_s=2"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  port.close()
  assert result.returncode != 0
  assert "DEADLINE_EXCEEDED" in result.stderr, result.stderr[-2000:]
  assert time.time() - started < 60


def test_the_launchers_port_stays_reserved_for_the_coordinator():
  reservation = load_launcher().reserve_port()
  port = reservation.getsockname()[1]
  try:
    with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
      other.bind(("localhost", port))  # Another program: kept off.
    with socket.socket() as coordinator:  # gRPC binds with SO_REUSEPORT: allowed beside it.
      coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      coordinator.bind(("localhost", port))
      coordinator.listen()
  finally:
    reservation.close()


@pytest.mark.slow
def test_local_launcher_lets_preempted_processes_finish_and_exits_75(tmp_path):
  # Process 0 exits with 75 at once, process 1 a second later (still saving, say): it must not
  # be killed for it, and the launcher exits with 75.
  script = ("import os, sys, time\n"
            "if os.environ['DMJAX_PROCESS_ID'] == '1':\n"
            "  time.sleep(1)\n"
            f"  open({str(tmp_path / 'finished')!r}, 'w').close()\n"
            "sys.exit(75)\n")
  result = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2", "--",
                           sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == preemption.EXIT_STATUS == 75, result.stderr
  assert (tmp_path / "finished").exists()


def fake_slurm(tmp_path, srun_status: int) -> tuple[dict[str, str], str]:
  """A PATH whose `srun` records its arguments and exits with `srun_status`, and whose
  `scontrol` records its own; (environment, record file)."""
  bin_dir, record = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir(exist_ok=True)
  for name, status in (("srun", srun_status), ("scontrol", 0)):
    (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\nexit {status}\n')
    (bin_dir / name).chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242"), record


@pytest.mark.slow
@pytest.mark.parametrize("status, requeued", [(75, True), (0, False), (1, False)])
def test_sbatch_requeues_the_job_exactly_when_the_run_was_preempted(tmp_path, status, requeued):
  env, record = fake_slurm(tmp_path, status)
  result = subprocess.run(["bash", "launch/slurm.sbatch", "configs/r64.py", "/shared/w"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == status, result.stderr
  calls = record.read_text().splitlines()
  assert calls[0].startswith("srun ") and "--kill-on-bad-exit=1" not in calls[0]
  assert "python -m dmjax.main --distributed --config=configs/r64.py --workdir=/shared/w" in (
      calls[0])
  assert calls[1:] == (["scontrol requeue 4242"] if requeued else [])


def test_sbatch_asks_for_requeueing_and_says_where_the_workdir_must_be():
  with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
    text = f.read()
  directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
  assert "--requeue" in directives and "--signal=TERM@120" in directives
  assert "WORKDIR must be on a filesystem every node sees" in text
  assert "jax.parallel.initialize" not in text.replace("dmjax.parallel.initialize", "")


def pod_outcome(policy: dict, exit_code: int, disrupted: bool = False) -> str:
  """What a Job's podFailurePolicy does with a pod that ended with `exit_code` (Kubernetes'
  rules: the first matching rule decides; exit code 0 matches no exit-code rule)."""
  if exit_code == 0 and not disrupted:
    return "Succeeded"
  for rule in policy["rules"]:
    codes = rule.get("onExitCodes")
    if codes is not None and exit_code != 0:
      if (exit_code in codes["values"]) == (codes["operator"] == "In"):
        return rule["action"]
    for condition in rule.get("onPodConditions", []):
      if disrupted and condition["type"] == "DisruptionTarget":
        return rule["action"]
  return "Count"


def test_kubernetes_job_replaces_preempted_pods_and_fails_on_anything_else():
  with open(os.path.join(REPO, "launch", "kubernetes.yaml")) as f:
    job = [d for d in yaml.safe_load_all(f) if d["kind"] == "Job"][0]
  spec, pod = job["spec"], job["spec"]["template"]["spec"]
  assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] == 0
  assert spec["completionMode"] == "Indexed"
  container_names = {c["name"] for c in pod["containers"]}
  for rule in spec["podFailurePolicy"]["rules"]:
    assert rule.get("onExitCodes", {}).get("containerName", "dmjax") in container_names
  policy = spec["podFailurePolicy"]
  assert pod_outcome(policy, preemption.EXIT_STATUS) == "Ignore"  # A new pod resumes.
  assert pod_outcome(policy, 137, disrupted=True) == "Ignore"  # Evicted before it could save.
  assert pod_outcome(policy, 1) == pod_outcome(policy, 134) == "FailJob"
  assert pod_outcome(policy, 0) == "Succeeded"
  assert any(arg.startswith("--initialization_timeout_s=") for arg in pod["containers"][0][
      "command"])


HOLD_WORKDIR = """
import sys, time
from dmjax import checkpoints
with checkpoints.hold_workdir(sys.argv[1]):
  print("holding", flush=True)
  time.sleep(300)
"""


@pytest.mark.slow
def test_a_second_run_of_a_live_workdir_refuses_and_leaves_its_saves_alone(tmp_path):
  workdir = tmp_path / "run"
  in_flight = workdir / "checkpoints" / "7.orbax-checkpoint-tmp-1"  # The live run's save.
  in_flight.mkdir(parents=True)
  holder = subprocess.Popen([sys.executable, "-c", HOLD_WORKDIR, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "holding\n"
    config = tiny_config(str(tmp_path / "tfds"))  # Never built: the refusal comes first.
    config.num_train_steps = 1
    with pytest.raises(errors.UserError) as refusal:
      train.train_and_evaluate(config, str(workdir))
    message = str(refusal.value)
    assert "\n" not in message
    assert (f"{workdir} is in use by another run (pid {holder.pid} on host "
            f"{socket.gethostname()} holds {workdir}/run.lock)") in message
    assert in_flight.is_dir()
  finally:
    holder.send_signal(signal.SIGKILL)  # The OS releases the lock of a killed holder.
    holder.wait()
  with checkpoints.hold_workdir(str(workdir)):
    pass


class RecordingIterator:
  def __init__(self):
    self.seeks = []

  def seek(self, next_batch: int) -> None:
    self.seeks.append(next_batch)


def test_another_batch_size_continues_at_the_same_example_or_refuses(tmp_path):
  config = config_lib.base_config()
  config.batch_size = 4
  manager = checkpoints.create_manager(str(tmp_path), async_save=False, keep=10)
  variables = {"w": np.zeros(2, np.float32)}
  checkpoints.save(manager, 5, model=variables, config=config, examples_seen=20, force=True)
  checkpoints.save(manager, 6, model=variables, config=config, force=True)  # Written before
  manager.wait_until_finished()  # the count was recorded: 6 batches of its own 4.
  iterator = RecordingIterator()
  assert checkpoints.continue_data(manager, 5, iterator, batch_size=5) == 4
  assert checkpoints.continue_data(manager, 5, iterator, batch_size=4) == 5
  assert checkpoints.continue_data(manager, 6, iterator, batch_size=8) == 3
  assert iterator.seeks == [4, 5, 3]
  with pytest.raises(errors.UserError, match=r"checkpoints/5: its run had used 20 training "
                     r"examples, which is not a whole number of batches of "
                     r"config.batch_size=8; .*\(such as the run's own, 4\)$"):
    checkpoints.continue_data(manager, 5, iterator, batch_size=8)
  assert iterator.seeks == [4, 5, 3]
  manager.close()


def test_resuming_on_another_process_count_with_a_batch_size_that_would_skip_examples_refuses(
    one_device_run, tmp_path, monkeypatch):
  config, workdir = one_device_run  # 3 steps of 4 examples: the next example is the 13th.
  shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  monkeypatch.setattr(checkpoints, "saved_process_count", lambda manager, step: 2)
  with pytest.raises(errors.UserError, match="used 12 training examples, which is not a whole "
                                             "number of batches of config.batch_size=8"):
    train.train_and_evaluate(copy_of(config, batch_size=8, num_train_steps=6), str(tmp_path))
