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
