"""How many XLA programs this process has compiled: `count()`.

A photo of a new size must not stall the model thread while XLA compiles (seconds on a CPU), so
the tests and the benchmark check that, after `Predictor.warm_up`, photos of new sizes make no
new program. The figures come from `jax.monitoring`, which JAX feeds on every compilation
anywhere in the process (a jitted function, an eager op on a new shape, a program loaded from
the persistent compilation cache): the counts cover more than `Predictor`'s own functions.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import jax

# What JAX records around each program it makes, and when one comes from the persistent cache.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_programs = 0
_from_cache = 0
_installed = False


class Compilations(NamedTuple):
  programs: int  # Programs made: compiled now, or loaded from the persistent cache.
  from_cache: int  # Of those, loaded from the persistent compilation cache.

  @property
  def compiled(self) -> int:
    """Programs XLA compiled in this process (not loaded from the persistent cache)."""
    return self.programs - self.from_cache


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  global _programs
  if event == _BACKEND_COMPILE_EVENT:
    with _lock:
      _programs += 1


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  global _from_cache
  if event == _CACHE_HIT_EVENT:
    with _lock:
      _from_cache += 1


def install() -> None:
  """Starts counting (once per process; later calls do nothing). Programs made before are not
  counted."""
  global _installed
  with _lock:
    if _installed:
      return
    _installed = True
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


def count() -> Compilations:
  """Programs made since `install()` (which this calls)."""
  install()
  with _lock:
    return Compilations(_programs, _from_cache)
