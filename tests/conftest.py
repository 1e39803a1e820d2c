"""Fixtures shared by the test files: tiny datasets, built once per test session.

`tiny_data_config` is session-scoped and shared: copy it (`copy_and_resolve_references()`)
before changing anything.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

# One persistent compilation cache for the whole session, subprocesses included: the tests
# compile the same few programs many times, and on 2 cores compiling dominates their time.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "dmjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from dmjax import allocator  # noqa: E402
from dmjax import config as config_lib  # noqa: E402

# The tests run under the allocator the commands run under (dmjax.allocator): pytest-xdist's
# workers, started after this file is read, and every process a test starts inherit it.
_ALLOCATOR = allocator.choose(os.environ.get(allocator.ENV))
if _ALLOCATOR and allocator.running() == "system" and "LD_PRELOAD" not in os.environ:
  os.environ["LD_PRELOAD"] = _ALLOCATOR

TINY_RESOLUTION = 32
TINY_NUM_TRAIN = 24
TINY_NUM_TEST = 8


def tiny_config(tfds_dir: str):
  config = config_lib.base_config()
  config.data.tfds_dir = tfds_dir
  config.data.resolution = TINY_RESOLUTION
  config.data.synthetic.resolution = TINY_RESOLUTION
  config.data.synthetic.num_train = TINY_NUM_TRAIN
  config.data.synthetic.num_test = TINY_NUM_TEST
  config.data.num_workers = 0
  config.batch_size = 4
  config.eval_batch_size = 4
  return config


@pytest.fixture(scope="session")
def tiny_data_config(tmp_path_factory):
  """base_config() over a built synthetic dataset of 24 train and 8 test scenes at 32 px;
  batch_size 4, no worker processes."""
  from dmjax.data import pipeline

  config = tiny_config(str(tmp_path_factory.mktemp("tfds")))
  pipeline.prepare(config)
  return config


def copy_of(config, **overrides):
  """A copy of `config` with dotted keys set, e.g. copy_of(c, **{"data.num_workers": 2})."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, last = key.split(".")
    parent = config
    for part in path:
      parent = parent[part]
    parent[last] = value
  return config


def tiny_run_config(config, **overrides):
  """A copy of `config` for a 6-step run that saves every 2 steps, fed as the stage configs
  feed it (predecoded, augmented on the device); dotted keys override."""
  defaults = {"num_train_steps": 6, "log_every_steps": 2, "eval_every_steps": 4,
              "checkpoint_every_steps": 2, "optimizer.warmup_steps": 2,
              "data.num_eval_examples": 8, "eval_batch_size": 4, "data.predecoded": True}
  return copy_of(config, **{**defaults, **overrides})


# Prepended to a `python -c` script: TensorFlow is then as if not installed, found by no finder
# (unlike sys.modules[...] = None, which libraries read as "TensorFlow is loaded").
HIDE_TENSORFLOW = """
import importlib.machinery, sys

class HideTensorFlow:
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow":
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)

  @classmethod
  def invalidate_caches(cls):
    importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path[:] = [HideTensorFlow if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
"""


@pytest.fixture(scope="session")
def untrained_workdir(tmp_path_factory):
  """The default model, tiny (32 px), at its initial weights, saved as a run: for the tools that
  read a run (predict, serve, export) and need no training. Treat it as read-only."""
  import jax
  import numpy as np

  from dmjax import checkpoints, models, train

  config = tiny_config(str(tmp_path_factory.mktemp("unused_tfds")))
  workdir = str(tmp_path_factory.mktemp("untrained_run"))
  model = models.create_model(config.model)
  variables = train.initial_variables(model, jax.random.PRNGKey(0), TINY_RESOLUTION)
  checkpoints.save_imported_model(workdir, config, jax.tree.map(np.asarray, variables))
  return workdir


def run_command(main, *args) -> str | None:
  """A command's `main` on arguments: its one-line exit message, or None when it succeeds."""
  try:
    main([str(a) for a in args])
  except SystemExit as e:
    assert e.code is not None and e.code != 0
    return str(e.code)
  return None


def read_png(path):
  """(PIL mode, pixels) of an image file."""
  import numpy as np
  from PIL import Image

  with Image.open(path) as image:
    return image.mode, np.asarray(image)


@pytest.fixture(scope="session")
def trained(tiny_data_config, tmp_path_factory):
  """(config, workdir, final metrics) of one uninterrupted tiny run with the real TensorBoard
  writer, shared by the training and evaluation tests: treat the workdir as read-only."""
  from dmjax import train

  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny_run_config(tiny_data_config)
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


@pytest.fixture(scope="session")
def one_device_run(tiny_data_config, tmp_path_factory):
  """(config, workdir) of a 3-step SGD run on this process's one CPU device: the reference that
  runs on more devices and more processes must reproduce. SGD, because Adam would amplify
  summation-order noise in near-zero gradients (g / sqrt(v) ~ sign(g)); at a constant rate, so
  that runs of other lengths compile the same step (and find it in the compilation cache)."""
  from dmjax import train

  config = tiny_run_config(tiny_data_config, num_train_steps=3, log_every_steps=1,
                           eval_every_steps=100, checkpoint_every_steps=100,
                           **{"optimizer.name": "sgd", "optimizer.learning_rate": 0.05,
                              "optimizer.schedule": "step", "optimizer.step_every": 0})
  workdir = str(tmp_path_factory.mktemp("one_device"))
  train.train_and_evaluate(config, workdir)
  return config, workdir


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(directory, config) -> str:
  """A config file for `dmjax.main` in `directory` (a pathlib.Path) that returns `config`."""
  (directory / "config.json").write_text(config.to_json())
  path = directory / "config.py"
  path.write_text(
      "import json, ml_collections\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict(json.loads(open({str(directory / 'config.json')!r})"
      ".read()))\n")
  return str(path)


def main_command(config_path, workdir, *extra):
  return [sys.executable, "-m", "dmjax.main", f"--config={config_path}", f"--workdir={workdir}",
          *extra]


def cpu_env(devices: int, **variables) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **variables)


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


def start_processes(command, num_processes: int, log_dir, devices: int = 2, **env_variables):
  """Starts `command` as the processes of one jax.distributed run on localhost, as
  launch/local.py does, `devices` CPU devices each; process i logs to log_dir/process{i}.log
  (a file: an unread pipe fills up and blocks the writer). Returns their Popen objects; the
  caller must kill what is still running when it is done (`kill_all`)."""
  # Only process 0 writes the persistent compilation cache, under keys of its own: with programs
  # an earlier test compiled, process 0 would load them while process 1 compiles for minutes on
  # a loaded machine, and process 0 would give up waiting in the first collective (gloo's 30 s).
  env_variables.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  processes = []
  for index in range(num_processes):
    env = cpu_env(devices, DMJAX_DISTRIBUTED="1", DMJAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                  DMJAX_NUM_PROCESSES=str(num_processes), DMJAX_PROCESS_ID=str(index),
                  **env_variables)
    with open(log_dir / f"process{index}.log", "w") as log:
      processes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                        stderr=log, start_new_session=True))
  return processes


def kill_all(processes) -> None:
  """SIGKILL to the process groups of those still running (their grain workers too)."""
  for process in processes:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()


def relative_update_difference(config, first, second) -> float:
  """|Δfirst − Δsecond| / |Δfirst| over every variable, Δ being the change from `config`'s
  initial variables: how far two runs that should agree moved apart.

  Per element, runs that sum in another order (other devices, other processes) differ by up to
  tens of percent of the change of leaves that barely move; over the whole update that is float
  noise (1e-5 seen). Per-device gradients or statistics, or data that depends on the layout,
  would change the update itself.
  """
  import jax
  import numpy as np

  from dmjax import models, train

  model = models.create_model(config.model)
  initial = train.create_train_state(config, model, train.create_optimizer(config),
                                     jax.random.PRNGKey(config.seed)).variables
  first_change, second_change = (
      np.concatenate([(np.asarray(v) - np.asarray(v0)).ravel() for v, v0 in
                      zip(jax.tree.leaves(variables), jax.tree.leaves(initial), strict=True)])
      for variables in (first, second))
  return float(np.linalg.norm(first_change - second_change) / np.linalg.norm(first_change))
