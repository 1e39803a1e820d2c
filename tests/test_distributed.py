"""Multi-process training on one machine: 2 processes × 2 CPU devices, gloo collectives."""

import glob
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
  copy_of,
  kill_all,
  main_command,
  relative_update_difference,
  run_group,
  start_processes,
  write_config,
)

from dmjax import checkpoints, models, parallel, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def distributed_config(one_device_run):
  return one_device_run[0]


# For runs of programs an earlier run of this session compiled: only process 0 writes the
# persistent compilation cache, under keys of its own, so process 0 would load them while process
# 1 compiles for a minute or more on a loaded machine, and process 0 would give up waiting for it
# in the first collective (gloo's 30 s). Without the cache both compile, and start together.
SAME_START = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")


def restore_everything(config, workdir, step):
  """(model, train) items of a checkpoint, restored on this process's one device, and the global
  batch its data continues at on a process count that cannot restore the saved iterators."""
  state = train.create_train_state(config, models.create_model(config.model),
                                   train.create_optimizer(config), jax.random.PRNGKey(0))
  manager = checkpoints.create_manager(str(workdir), read_only=True, async_save=False)

  class Seek:
    def seek(self, batch):
      self.batch = batch

  iterator = Seek()
  model_item, train_item, _ = checkpoints.restore(
      manager, step, model=state.variables, train=train.split_state(state)[1],
      sharding=parallel.replicated(parallel.create_mesh()))
  checkpoints.continue_data(manager, step, iterator, batch_size=config.batch_size)
  manager.close()
  return jax.tree.map(np.asarray, model_item), jax.tree.map(np.asarray, train_item), (
      iterator.batch)


def relative_difference(first, second) -> float:
  first, second = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
                   for t in (first, second))
  return float(np.linalg.norm(first - second) / np.linalg.norm(first))


def test_two_processes_match_one_process_resume_on_two_and_restore_in_one(one_device_run,
                                                                          tmp_path):
  """Two processes train 2 steps, then resume on two (each process restoring its own iterator)
  for a third: the result matches one process's 3 steps, model, optimizer state and data
  position, and a single process restores all three."""
  config, single = one_device_run
  multi = tmp_path / "multi"

  def launch(num_train_steps: int) -> str:
    directory = tmp_path / f"config{num_train_steps}"
    directory.mkdir()
    returncode, stderr = run_group(
        [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices_per_process=2",
         "--", *main_command(write_config(directory, copy_of(config, num_train_steps=
                                                             num_train_steps)), multi)],
        env=SAME_START)
    assert returncode == 0, stderr[-3000:]
    return stderr

  launch(2)
  resumed = launch(3)
  assert resumed.count(f"Resumed from {multi}/checkpoints at step 2") == 2, resumed[-3000:]
  assert "continuing the data at global batch" not in resumed  # Both restored their own.
  for index in range(2):
    with open(multi / "checkpoints" / "3" / "data" / f"process_{index}-of-2.json") as f:
      state = json.load(f)
    assert (state["next_batch"], state["process_index"], state["batch_size"]) == (3, index, 2)

  # One checkpoint, written together by both processes, that a single process restores: the
  # model, the optimizer state and the data position.
  one_model, one_train, one_batch = restore_everything(config, single, 3)
  two_model, two_train, two_batch = restore_everything(config, multi, 3)
  difference = relative_update_difference(config, one_model, two_model)
  assert difference < 1e-3, difference
  assert int(one_train["step"]) == int(two_train["step"]) == 3
  np.testing.assert_array_equal(one_train["rng"], two_train["rng"])
  difference = relative_difference(one_train["opt_state"], two_train["opt_state"])
  assert 0 < difference < 1e-3, difference  # SGD's momentum: the gradients' running sum.
  assert one_batch == two_batch == 3

  # The final metrics, evaluation and TensorBoard files are written once, by process 0.
  assert resumed.count("Final held-out metrics") == 1
  with open(multi / "final_metrics.json") as f:
    metrics = json.load(f)
  assert metrics and all(math.isfinite(v) for v in metrics.values())
  events = glob.glob(f"{multi}/events.out.tfevents.*")
  assert len(events) == 2, events  # One per launch.


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


# One process of a 2-process run: starts a stage from `init_from` as training does, and checks
# where the parameters it loaded are.
# (The barrier keeps the processes together before the first collective: on a loaded machine
# one may reach it more than gloo's 30 s connection timeout after the other.)
_INIT_FROM_SCRIPT = """
import json, sys
import jax, ml_collections
from jax._src import distributed
from dmjax import models, parallel, train

parallel.initialize()
config = ml_collections.ConfigDict(json.loads(open(sys.argv[1]).read()))
mesh, model = parallel.create_mesh(), models.create_model(config.model)
shapes = jax.eval_shape(lambda: train.create_train_state(
    config, model, train.create_optimizer(config), jax.random.PRNGKey(1)))
state = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype, device=parallel.replicated(mesh)),
                     shapes)  # Placed as training places it; the values do not matter.
distributed.global_state.client.wait_at_barrier("placed", 600_000)
loaded = train.load_previous_stage(state, config)
for leaf in jax.tree.leaves(loaded.variables):
  assert leaf.sharding == parallel.replicated(mesh), leaf.sharding
  assert len(leaf.sharding.device_set) == jax.device_count() == 4, leaf.sharding
print("loaded", jax.process_index(), file=sys.stderr)
"""


def test_two_processes_start_a_stage_from_init_from_replicated(one_device_run, tmp_path):
  config, single = one_device_run
  config = config.copy_and_resolve_references()
  config.init_from = single
  (tmp_path / "config.json").write_text(config.to_json())
  returncode, stderr = run_group(
      [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices_per_process=2",
       "--", sys.executable, "-c", _INIT_FROM_SCRIPT, str(tmp_path / "config.json")])
  assert returncode == 0, stderr[-3000:]
  assert "loaded 0" in stderr and "loaded 1" in stderr, stderr[-3000:]
