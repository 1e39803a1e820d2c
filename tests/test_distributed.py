"""Multi-process training on one machine: 2 processes × 2 CPU devices, gloo collectives."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import relative_update_difference

from dmjax import checkpoints

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp_path, config) -> str:
  """A config file for `dmjax.main` that returns `config`."""
  (tmp_path / "config.json").write_text(config.to_json())
  path = tmp_path / "config.py"
  path.write_text(
      "import json, ml_collections\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict(json.loads(open({str(tmp_path / 'config.json')!r})"
      ".read()))\n")
  return str(path)


def main_command(config_path, workdir, *extra):
  return [sys.executable, "-m", "dmjax.main", f"--config={config_path}", f"--workdir={workdir}",
          *extra]


def cpu_env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_group(command, timeout=600, **kwargs) -> tuple[int, str]:
  """Runs `command` in its own process group; (exit status, stderr). A process stuck in a
  collective that its peer never joins would hang the suite, so past `timeout` the whole group
  (the launcher's children too) is killed and the test fails."""
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
  try:
    _, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    pytest.fail(f"{command[1:3]} did not finish in {timeout} s: {stderr[-3000:]}")
  return process.returncode, stderr


@pytest.fixture(scope="module")
def distributed_config(one_device_run):
  return one_device_run[0]


def test_two_processes_match_one_process_and_restore_in_one(one_device_run, tmp_path):
  config, single = one_device_run
  multi = tmp_path / "multi"
  returncode, stderr = run_group(
      [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices_per_process=2",
       "--", *main_command(write_config(tmp_path, config), multi)])
  assert returncode == 0, stderr[-3000:]

  # One checkpoint, written together by both processes, that a single process restores.
  _, one, step = checkpoints.restore_model(single)
  _, two, step_two = checkpoints.restore_model(str(multi))
  assert step == step_two == 3
  difference = relative_update_difference(config, one, two)
  assert difference < 1e-3, difference
  assert (multi / "final_metrics.json").exists()  # Written once, by process 0.


def test_a_dead_process_makes_the_other_fail_fast(distributed_config, tmp_path):
  config = distributed_config.copy_and_resolve_references()
  config.num_train_steps = 100_000
  config.checkpoint_every_steps = 2
  config_path = write_config(tmp_path, config)
  workdir = tmp_path / "run"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  processes = []
  for index in range(2):
    env = dict(cpu_env(2), DMJAX_DISTRIBUTED="1", DMJAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               DMJAX_NUM_PROCESSES="2", DMJAX_PROCESS_ID=str(index))
    # Logs to a file: an unread pipe fills up and blocks the writer.
    with open(tmp_path / f"process{index}.log", "w") as log:
      processes.append(subprocess.Popen(
          main_command(config_path, workdir, "--heartbeat_timeout_s=5"), env=env, cwd=REPO,
          stdout=subprocess.DEVNULL, stderr=log))
  survivor, victim = processes
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists():  # Both are training.
      assert time.time() < deadline and survivor.poll() is None, "training did not start"
      time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor.wait(timeout=120)
    assert survivor.returncode != 0
    assert time.time() - killed_at < 120
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
