"""Interrupted runs: SIGTERM to every process of a multi-process run, `kill -9` at any moment
(during an asynchronous save too), and resuming on another number of processes.

Every run here is an 80-step SGD run of the tiny config on two CPU devices that logs every step:
one process with two devices, or two processes with one each. The two compute the same bits
(each reduction across devices adds two numbers, which gives the same sum in either order), so
every interrupted run, resumed on either, must end exactly where the uninterrupted one does.
"""

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import (
    REPO,
    copy_of,
    cpu_env,
    kill_all,
    main_command,
    run_group,
    start_processes,
    write_config,
)

from dmjax import checkpoints, preemption

pytestmark = pytest.mark.slow

NUM_STEPS = 80


def run_config(one_device_run, **overrides):
  """`one_device_run`'s config (its step, in the compilation cache), for NUM_STEPS steps."""
  return copy_of(one_device_run[0], **{
      "num_train_steps": NUM_STEPS, "log_every_steps": 1, "eval_every_steps": 1000,
      "checkpoint_every_steps": 20, "keep_checkpoints": 100, **overrides})


@pytest.fixture(scope="module")
def reference(one_device_run, tmp_path_factory):
  """(config, workdir) of the uninterrupted run, one process with two devices; it keeps the
  checkpoints of steps 20, 40, 60 and 80."""
  config = run_config(one_device_run)
  directory = tmp_path_factory.mktemp("reference")
  returncode, stderr = run_group(main_command(write_config(directory, config), directory / "run"),
                                 env=cpu_env(2))
  assert returncode == 0, stderr[-3000:]
  return config, directory / "run"


def saved_steps(workdir) -> list[int]:
  return sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*")
                if os.path.basename(p).isdigit())


def assert_same_final_variables(workdir, reference_workdir) -> None:
  ours, theirs = (checkpoints.restore_model(str(w))[1] for w in (workdir, reference_workdir))
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(x, y)


def wait_for(condition, processes, timeout: float, what: str, interval: float = 0.1) -> None:
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline or any(p.poll() is not None for p in processes):
      pytest.fail(f"{what}: not seen in {timeout} s, or a process ended first")
    time.sleep(interval)


def read(path) -> str:
  with open(path) as f:
    return f.read()


def test_sigterm_to_every_process_saves_one_agreed_step_and_resumes_exactly_on_one(
    reference, tmp_path):
  """Two processes start from no built data and from step 20 of the reference (written by one
  process). SIGTERM reaches each at its own random moment, as SLURM sends it: both save the same
  step and exit with status 75 (pre-empted, unfinished), having built and predecoded the data
  once. Resumed on one process from that step, the run ends exactly where the uninterrupted one
  does."""
  config, reference_workdir = reference
  # Saving every step keeps the run from reaching its end before the processes agree to stop,
  # however fast the machine, and puts a save in progress wherever the signal lands.
  config = copy_of(config, checkpoint_every_steps=1, **{"data.tfds_dir": str(tmp_path / "tfds")})
  config_path = write_config(tmp_path, config)
  workdir = tmp_path / "run"
  shutil.copytree(reference_workdir / "checkpoints" / "20", workdir / "checkpoints" / "20")
  logs = tmp_path / "logs"
  logs.mkdir()
  processes = start_processes(main_command(config_path, workdir), 2, logs, devices=1)
  try:
    wait_for(lambda: "step 21/" in read(logs / "process0.log"), processes, 400, "training")
    for process in processes:
      time.sleep(random.uniform(0, 0.5))
      process.send_signal(signal.SIGTERM)
    for process in processes:
      process.wait(timeout=300)
  finally:
    kill_all(processes)
  texts = [read(logs / f"process{i}.log") for i in range(2)]
  assert [p.returncode for p in processes] == [preemption.EXIT_STATUS] * 2 == [75, 75], (
      texts[0][-3000:] + texts[1][-3000:])
  saved = [re.findall(r"Saved step (\d+) after SIGTERM", text) for text in texts]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  stopped_at = int(saved[0][0])
  assert 20 < stopped_at < NUM_STEPS and saved_steps(workdir)[-1] == stopped_at
  manager = checkpoints.create_manager(str(workdir), read_only=True, async_save=False)
  assert checkpoints.examples_seen(manager, stopped_at) == stopped_at * config.batch_size
  manager.close()
  for text in texts:
    assert "a run of 1 process(es), this one has 2: continuing the data at global batch 20" in text
  # One process built the dataset and predecoded its training split, the other waited for it.
  everything = "".join(texts)
  assert everything.count("Building dmjax_synthetic/") == 1, everything[-3000:]
  assert everything.count("Predecoding ") == 1, everything[-3000:]

  returncode, stderr = run_group(main_command(config_path, workdir), env=cpu_env(2))
  assert returncode == 0, stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints at step {stopped_at}." in stderr
  assert ("a run of 2 process(es), this one has 1: continuing the data at global batch "
          f"{stopped_at}") in stderr
  assert_same_final_variables(workdir, reference_workdir)


def test_sigterm_to_the_process_group_then_kill_9_twice_resumes_bit_identically(
    one_device_run, reference, tmp_path):
  """One process with a grain worker, interrupted three times, each time re-run with the same
  command: SIGTERM to its whole process group at a random moment (as clusters send it, workers
  included), which saves and exits with 75; `kill -9` at a random moment; `kill -9` while an
  asynchronous save is being written. The last run ends exactly where the uninterrupted one
  does."""
  config = run_config(one_device_run, checkpoint_every_steps=3, **{"data.num_workers": 1})
  command = main_command(write_config(tmp_path, config), tmp_path / "run")
  workdir, checkpoint_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
  log = tmp_path / "run.log"

  def start():
    with open(log, "w") as f:
      return subprocess.Popen(command, cwd=REPO, env=cpu_env(2), stdout=subprocess.DEVNULL,
                              stderr=f, start_new_session=True)

  def unfinished() -> set[str]:  # Checkpoint folders that are not (yet) a finished step.
    return {name for name in os.listdir(checkpoint_dir) if not name.isdigit()}

  process = start()
  try:
    wait_for(lambda: "step 2/" in read(log), [process], 400, "training")
    time.sleep(random.uniform(0, 0.5))
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == preemption.EXIT_STATUS, read(log)[-3000:]
    stopped_at = int(re.findall(r"Saved step (\d+) after SIGTERM", read(log))[0])
    assert saved_steps(workdir)[-1] == stopped_at < NUM_STEPS

    process = start()
    some_steps_later = stopped_at + random.randint(1, 20)
    wait_for(lambda: saved_steps(workdir)[-1] >= some_steps_later, [process], 400,
             "a later checkpoint")
    time.sleep(random.uniform(0, 0.2))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert saved_steps(workdir)[-1] < NUM_STEPS

    left_over = unfinished()  # By the kill, if it hit a save.
    process = start()
    killed_during_save = False
    while not killed_during_save:
      wait_for(lambda: unfinished() - left_over, [process], 400, "a save in progress",
               interval=0.005)
      os.killpg(process.pid, signal.SIGSTOP)  # Frozen mid-save, if it has not finished already.
      if unfinished() - left_over:
        os.killpg(process.pid, signal.SIGKILL)
        killed_during_save = True
      else:
        os.killpg(process.pid, signal.SIGCONT)
    process.wait()
    assert saved_steps(workdir)[-1] < NUM_STEPS

    process = start()
    assert process.wait(timeout=600) == 0, read(log)[-3000:]
  finally:
    kill_all([process])
  assert_same_final_variables(workdir, reference[1])
