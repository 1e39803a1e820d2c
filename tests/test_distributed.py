"""Multi-process training on one machine: 2 processes × 2 CPU devices, gloo collectives."""

import signal
import sys
import time

import pytest
from conftest import (
  kill_all,
  main_command,
  relative_update_difference,
  run_group,
  start_processes,
  write_config,
)

from dmjax import checkpoints

pytestmark = pytest.mark.slow


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
  processes = start_processes(main_command(config_path, workdir, "--heartbeat_timeout_s=5"), 2,
                              tmp_path)
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
    kill_all(processes)
