"""What long work tells the person waiting for it: progress with rate and ETA, and the device.

  with progress.Progress("video", total=num_frames, unit="frames") as bar:
    for batch in batches:
      ...
      bar.advance(len(batch))

  for example in progress.track(examples, "predecode train", total=len(examples)):
    ...

On a terminal the bar is one line on stderr that updates in place (at most ten times a second);
in a log file (not a terminal) it writes a line at the first update, then at most one every
`every_s` seconds, and a last one when the work ends. The rate is measured from the first update
on, not from the start: the first batch often pays for compiling or opening files, and counting
it would make every later ETA too long.

`device_banner()` says which devices JAX runs on, and warns when an NVIDIA GPU is present but JAX
sees only the CPU (the CPU-only jaxlib installed, or the CUDA plugin failing to load).
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, TypeVar

import jax
from absl import logging

from dmjax import allocator

T = TypeVar("T")
TTY_REFRESH_S = 0.1
LOG_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
  """0:07, 12:34, 1:02:03 (hours:minutes:seconds, rounded to the second)."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_rate(per_second: float, unit: str) -> str:
  """12 frames/s, 3.4 frames/s, or for slow work 2.5 s/frame (its unit without the plural s)."""
  if per_second >= 10:
    return f"{per_second:.0f} {unit}/s"
  if per_second >= 1:
    return f"{per_second:.1f} {unit}/s"
  if unit.endswith(("ches", "shes", "sses", "xes")):  # batches, boxes
    singular = unit[:-2]
  else:
    singular = unit[:-1] if unit.endswith("s") else unit
  return f"{1 / per_second:.1f} s/{singular}" if per_second > 0 else f"0 {unit}/s"


class Progress:
  """Progress of `total` units of work (None: unknown, then no ETA), reported on `stream`."""

  def __init__(self, what: str, total: int | None = None, *, unit: str = "items",
               stream: IO | None = None, clock: Callable[[], float] = time.monotonic,
               tty: bool | None = None, every_s: float | None = None):
    self.what, self.total, self.unit = what, total, unit
    self.stream = sys.stderr if stream is None else stream
    self.tty = _is_tty(self.stream) if tty is None else tty
    self.every_s = (TTY_REFRESH_S if self.tty else LOG_EVERY_S) if every_s is None else every_s
    self.clock = clock
    self.start = clock()
    self.done = 0
    self._first: tuple[float, int] | None = None  # (time, done) at the first update.
    self._shown_at: float | None = None
    self._width = 0
    self._closed = False

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close(finished=exc_type is None)

  def advance(self, count: int = 1) -> None:
    self.update(self.done + count)

  def update(self, done: int) -> None:
    """`done` units are complete."""
    now = self.clock()
    self.done = done
    if self._first is None:
      self._first = (now, done)
    if self._shown_at is None or now - self._shown_at >= self.every_s:
      self._show(self.line(now), now)

  def rate(self, now: float | None = None) -> float | None:
    """Units per second since the first update (or since the start, before a second one)."""
    now = self.clock() if now is None else now
    if self._first is not None and self.done > self._first[1] and now > self._first[0]:
      return (self.done - self._first[1]) / (now - self._first[0])
    if self.done > 0 and now > self.start:
      return self.done / (now - self.start)
    return None

  def eta_s(self, now: float | None = None) -> float | None:
    """Seconds still to go at the current rate; None while the total or the rate is unknown."""
    rate = self.rate(now)
    if self.total is None or rate is None:
      return None
    return max(self.total - self.done, 0) / rate

  def line(self, now: float | None = None) -> str:
    now = self.clock() if now is None else now
    if self.total:
      parts = [f"{self.what}: {self.done}/{self.total} {self.unit} "
               f"({100 * self.done / self.total:.0f}%)"]
    else:
      parts = [f"{self.what}: {self.done} {self.unit}"]
    rate = self.rate(now)
    if rate is not None:
      parts.append(format_rate(rate, self.unit))
    parts.append(f"{format_duration(now - self.start)} elapsed")
    eta = self.eta_s(now)
    if eta is not None and self.done < self.total:
      parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)

  def close(self, finished: bool = True) -> None:
    """Ends the bar: on success a last line with the total time and the average rate."""
    if self._closed:
      return
    self._closed = True
    now = self.clock()
    if finished:
      elapsed = now - self.start
      rate = f" ({format_rate(self.done / elapsed, self.unit)})" if self.done and elapsed else ""
      count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
      self._show(f"{self.what}: {count} {self.unit} in {format_duration(elapsed)}{rate}", now)
    if self.tty and self._shown_at is not None:
      self.stream.write("\n")
      self.stream.flush()

  def _show(self, text: str, now: float) -> None:
    if self.tty:
      # Spaces over what is left of a longer previous line; no terminal control codes.
      self.stream.write("\r" + text.ljust(self._width))
      self._width = len(text)
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
    self._shown_at = now


def track(items: Iterable[T], what: str, total: int | None = None, *, unit: str = "items",
          **kwargs) -> Iterator[T]:
  """`items`, counted on a `Progress` bar as the consumer takes them (`Progress`'s keywords)."""
  bar = Progress(what, total, unit=unit, **kwargs)
  finished = False
  try:
    for item in items:
      yield item
      bar.advance()
    finished = True
  finally:  # Also when the consumer stops early (GeneratorExit) or fails: no summary then.
    bar.close(finished=finished)


def _is_tty(stream: IO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


# --------------------------------------------------------------------------------------------
# Devices.


NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"


def nvidia_gpu_present(driver_file: str = NVIDIA_DRIVER_FILE) -> bool:
  """Whether this machine has an NVIDIA driver loaded (its /proc entry) or `nvidia-smi`."""
  return os.path.exists(driver_file) or shutil.which("nvidia-smi") is not None


def describe_devices(devices: Sequence) -> str:
  """'1 CPU device', '8 NVIDIA H100 80GB HBM3 (gpu)', '4 TPU v4 (tpu)', kinds in order seen."""
  kinds = collections.Counter((d.platform, d.device_kind) for d in devices)
  parts = []
  for (platform, kind), count in kinds.items():
    if platform == "cpu":
      parts.append(f"{count} CPU device{'s' if count > 1 else ''}")
    else:
      parts.append(f"{count} {kind} ({platform})")
  return " + ".join(parts)


def gpu_warning(devices: Sequence, gpu_present: bool, jax_platforms: str | None) -> str | None:
  """Why a GPU the machine has goes unused, when JAX runs on the CPU only; else None."""
  if not gpu_present or any(d.platform != "cpu" for d in devices):
    return None
  if jax_platforms and not any(p in jax_platforms for p in ("cuda", "gpu")):
    return None  # Asked for: JAX_PLATFORMS keeps it on the CPU.
  return ("an NVIDIA GPU is present (driver or nvidia-smi found) but JAX sees only the CPU: "
          "install the CUDA build with `pip install -c constraints.txt -e \".[cuda]\"` (or check "
          "the CUDA plugin's error above); running on the CPU, much slower")


def device_banner(stream: IO | None = None) -> str:
  """Says on `stream` (stderr) which devices JAX computes on, and returns it; logs a warning if a
  GPU goes unused. A line of its own, as the progress bars: it is for the person at the
  terminal, whatever the log's verbosity.

  Initializes JAX's backends: in a multi-process run call it after `jax.distributed.initialize`.
  """
  devices = jax.devices()
  processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
  text = (f"JAX {jax.__version__} runs on {describe_devices(devices)}{processes}; allocator: "
          f"{allocator.describe()}.")
  print(text, file=sys.stderr if stream is None else stream, flush=True)
  warning = gpu_warning(devices, nvidia_gpu_present(), os.environ.get("JAX_PLATFORMS"))
  if warning:
    logging.warning("%s", warning)
  return text


if __name__ == "__main__":  # `python -m dmjax.progress`: the devices and allocator commands get.
  device_banner()
