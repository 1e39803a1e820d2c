"""The `run` row: the main job itself, as a user starts it, under each allocator (and each source
tree, to set today's code beside an earlier checkout in one invocation)."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

import ml_collections

from dmjax import allocator
from dmjax.benchmark import timing
from dmjax.benchmark.settings import Settings

# The main job's progress line and end of training (dmjax.train).
_PROGRESS = re.compile(r"step (\d+)/\d+ .* ([\d.]+) steps/s")
TRAINING_DONE = "Training took"


def run_config(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """`config` cut to `steps` training steps, with no evaluation or checkpoint before the end
  and 64 held-out examples per evaluation (the final one still covers the whole split)."""
  config = config.copy_and_resolve_references()
  config.num_train_steps = steps
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 0
  config.data.num_eval_examples = 64
  return config


def _config_file(config: ml_collections.ConfigDict, folder: str) -> str:
  path = os.path.join(folder, "config.py")
  with open(path, "w") as f:
    f.write("import json\n\nimport ml_collections\n\n\ndef get_config():\n"
            f"  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
  return path


def steady_steps_per_sec(log: str) -> float | None:
  """The median rate of the logged windows after the first (which includes compiling)."""
  rates = [float(rate) for _, rate in _PROGRESS.findall(log)][1:]
  return round(statistics.median(rates), 3) if rates else None


def _environment(allocator_name: str, source: str) -> dict[str, str]:
  settings = {k for a in allocator.PREFERENCE for k, _ in a.settings}
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", allocator.ENV, *settings)}
  # Preloaded here rather than by the child's own re-execution, so that a source tree from
  # before dmjax.allocator runs under the same allocator.
  library = allocator.choose(allocator_name)
  env[allocator.ENV] = "system" if library is None else allocator_name
  if library:
    env.update(allocator.preload_environment(library, env))
  if source:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
  return env


def _process_figures(pid: int) -> timing.Row:
  """CPU seconds, minor page faults and peak RSS of a running process, all its threads (Linux's
  /proc: fields 10, 14 and 15 of `stat`, VmHWM of `status`)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()  # After the command name, which may hold spaces.
  with open(f"/proc/{pid}/status") as f:
    peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
  tick = os.sysconf("SC_CLK_TCK")
  user, system = int(fields[11]) / tick, int(fields[12]) / tick
  return {"user_s": round(user, 1), "system_s": round(system, 1),
          "system_share": round(system / (user + system), 3) if user + system else None,
          "minor_faults": int(fields[7]), "child_peak_rss_mb": round(peak_kb / 1024, 1)}


def run_main_job(config_path: str, workdir: str, env: dict[str, str]) -> timing.Row:
  """`python -m dmjax.main` in a child process, from its start to the end of its training (the
  final evaluation, the same for every variant, is not waited for): wall time, CPU times, page
  faults and peak RSS, and the steady training rate from its log."""
  child = subprocess.Popen([sys.executable, "-m", "dmjax.main", f"--config={config_path}",
                            f"--workdir={workdir}"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=workdir)
  started = time.perf_counter()
  log = []
  try:
    for line in child.stdout:
      log.append(line)
      if TRAINING_DONE in line:
        row = {"wall_s": round(time.perf_counter() - started, 1), **_process_figures(child.pid)}
        return {"steps_per_sec": steady_steps_per_sec("".join(log)), **row}
    child.wait()
    raise RuntimeError(f"the main job exited with {child.returncode} before the end of its "
                       f"training:\n{''.join(log[-20:])}")
  finally:
    child.kill()
    child.wait()


def measure_run(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  """`--run_steps` of the main job for each of `--run_allocators` × `--run_sources`, in
  `--run_rounds` interleaved rounds (a change in the host's load falls on every variant)."""
  config = run_config(config, settings.run_steps)
  variants = [(name, source) for source in settings.run_sources for name in settings.run_allocators]
  first_rate = {}
  with tempfile.TemporaryDirectory(prefix="dmjax-run-row-") as folder:
    config_path = _config_file(config, folder)
    for round_index in range(settings.run_rounds):
      for name, source in variants:
        workdir = tempfile.mkdtemp(dir=folder)
        row = run_main_job(config_path, workdir, _environment(name, source))
        rate = row["steps_per_sec"]
        first_rate.setdefault(round_index, rate)
        yield {"what": "run", "allocator": name, "source": source or "installed",
               "round": round_index, "steps": settings.run_steps,
               "images_per_sec": None if rate is None else round(rate * config.batch_size, 1),
               **row,
               "minor_faults_per_step": round(row["minor_faults"] / settings.run_steps),
               "rate_over_first_variant": (round(rate / first_rate[round_index], 3)
                                           if rate and first_rate[round_index] else None)}
