"""Timing and memory: whole steps timed in interleaved rounds, and the memory figures of a row."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import statistics
import time
from collections.abc import Callable

import jax
from absl import logging

Row = dict
MiB = 2**20


def timed_rate(step: Callable[[], int], *, seconds: float, max_steps: int) -> tuple[float, int]:
  """(items per second, steps) of calling `step` (returns items made) for `seconds`."""
  items, steps = 0, 0
  start = time.perf_counter()
  while steps < max_steps:
    items += step()
    steps += 1
    if time.perf_counter() - start >= seconds:
      break
  return items / (time.perf_counter() - start), steps


@dataclasses.dataclass
class Runner:
  """Something timed in whole steps: `run(n)` does n steps of `batch_size` and waits for them."""

  name: str
  run: Callable[[int], None]
  batch_size: int
  row: Row = dataclasses.field(default_factory=dict)  # What describes it in its output row.


def _seconds_of(run: Callable[[int], None], steps: int) -> float:
  start = time.perf_counter()
  run(steps)
  return time.perf_counter() - start


def interleaved_rates(runners: list[Runner], *, repeats: int,
                      repeat_seconds: float) -> dict[str, list[float]]:
  """Images/s of every runner in each of `repeats` rounds.

  Each runner first runs a step untimed (first-call work: allocation, autotuning, compilation
  where it is lazy) and a timed one that sizes its repeats. A round then times every runner in
  turn, so a change in the host's load falls on all of them, and per-round ratios cancel it.
  """
  steps = {}
  for runner in runners:
    runner.run(1)
    steps[runner.name] = max(1, math.ceil(repeat_seconds / _seconds_of(runner.run, 1)))
  logging.info("Timing %s steps per repeat.", steps)
  rates = {runner.name: [] for runner in runners}
  for round_index in range(repeats):
    for runner in runners:
      n = steps[runner.name]
      rates[runner.name].append(n * runner.batch_size / _seconds_of(runner.run, n))
    logging.info("Round %d/%d: %s images/s.", round_index + 1, repeats,
                 {name: round(r[-1], 2) for name, r in rates.items()})
  return rates


def rate_fields(rates: list[float]) -> Row:
  return {"images_per_sec": round(statistics.median(rates), 2),
          "images_per_sec_min": round(min(rates), 2), "images_per_sec_max": round(max(rates), 2),
          "repeats": len(rates)}


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
  return round(statistics.median(a / b for a, b in zip(numerator, denominator, strict=True)), 3)


def program_memory_mb(compiled) -> float | None:
  """Arguments + outputs + temporaries of a compiled program (donated arguments counted once)."""
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    return None
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return round(total / MiB, 1)


def own_peak_rss_bytes() -> int:
  """This process's own peak RSS (VmHWM). Unlike ru_maxrss, which after fork and exec keeps
  the parent's high-water mark, it starts afresh in every new program."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise OSError("/proc/self/status has no VmHWM line")


def memory_fields() -> Row:
  """Host RSS now and at its peak, and the device's peak memory in use (null where unknown)."""
  # ru_maxrss is in KiB on Linux (bytes on macOS, which this project does not target).
  row = {"host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  try:
    with open("/proc/self/statm") as statm:
      row["host_rss_mb"] = round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB,
                                 1)
  except OSError:
    row["host_rss_mb"] = None
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  row["device_peak_memory_mb"] = None if peak is None else round(peak / MiB, 1)
  return row
