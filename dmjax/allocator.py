"""The memory allocator dmjax's commands run under.

XLA's CPU runtime frees and allocates buffers of tens of MiB at every training step. glibc's
malloc returns every block over its mmap threshold (32 MiB at most, whatever its tuning knobs
say) to the kernel when it is freed, and the next step faults the same memory in again, page by
page: on the default run that was a fifth of all CPU time spent in the kernel (docs/benchmarks.md,
"The main job and its allocator"). An allocator that keeps freed memory removes that cost.

So a dmjax command (`python -m dmjax.X`, or a `dmjax-X` script) re-executes itself once, before
any work, with such an allocator in `LD_PRELOAD`. `DMJAX_ALLOCATOR` chooses it:

  auto (default)  the first of PREFERENCE that is installed (mimalloc comes with dmjax's own
                  requirements on Linux), else the system's malloc
  system          the system's malloc: no re-execution
  NAME            one of PREFERENCE, and an error if it is not installed
  /path/lib.so    that library

Library code (`import dmjax` in a notebook or a test) is never re-executed: `run_command` does it
only for the process's own command. A process already running under one of these allocators
(preloaded by the user, or the re-executed command) is left as it is.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import os
import sys
import sysconfig
from collections.abc import Mapping

ENV = "DMJAX_ALLOCATOR"
# Set on the re-executed process, so that a library the loader would not preload (a wrong path,
# another architecture) is reported once instead of re-executing for ever.
_REEXECUTED_ENV = "DMJAX_ALLOCATOR_REEXECUTED"


@dataclasses.dataclass(frozen=True)
class Allocator:
  name: str
  # File-name prefix of the shared library (as it appears in /proc/self/maps).
  library: str
  # Where it is found besides the system's library folders: a distribution and a path in it.
  wheel: tuple[str, str] | None = None
  # Its settings (environment variables) unless the user gave their own: keep freed memory
  # instead of handing it back to the kernel after a delay, which only brings back the faults.
  settings: tuple[tuple[str, str], ...] = ()


# In order of preference (docs/benchmarks.md, "The main job and its allocator"): mimalloc first,
# the one that installs from the package index everywhere.
PREFERENCE = (
    Allocator("mimalloc", "libmimalloc", wheel=("cmeel-mimalloc", "cmeel.prefix/lib"),
              settings=(("MIMALLOC_PURGE_DELAY", "-1"),)),
    Allocator("tcmalloc", "libtcmalloc"),
    Allocator("jemalloc", "libjemalloc",
              settings=(("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1"),)),
)
_BY_NAME = {allocator.name: allocator for allocator in PREFERENCE}


class AllocatorError(RuntimeError):
  """DMJAX_ALLOCATOR names an allocator that cannot be had."""


def _system_library_dirs() -> list[str]:
  arch = sysconfig.get_config_var("MULTIARCH") or ""
  dirs = [os.path.join(d, arch) for d in ("/usr/lib", "/lib", "/usr/local/lib") if arch]
  return [*dirs, "/usr/lib64", "/usr/lib", "/usr/local/lib"]


def _library_in(folder: str, prefix: str) -> str | None:
  # libtcmalloc_minimal before libtcmalloc (no profiler hooks); never the debug builds.
  found = sorted(path for path in glob.glob(os.path.join(folder, f"{prefix}*.so*"))
                 if "debug" not in os.path.basename(path) and "profiler" not in path)
  return found[-1] if found else None


def find(allocator: Allocator) -> str | None:
  """The path of `allocator`'s shared library, or None if it is not installed."""
  if allocator.wheel:
    distribution, folder = allocator.wheel
    try:
      path = _library_in(os.fspath(importlib.metadata.distribution(distribution)
                                   .locate_file(folder)), allocator.library)
    except importlib.metadata.PackageNotFoundError:
      path = None
    if path:
      return path
  for folder in _system_library_dirs():
    path = _library_in(folder, allocator.library)
    if path:
      return path
  return None


def choose(setting: str | None) -> str | None:
  """The library `DMJAX_ALLOCATOR=setting` asks for; None for the system's malloc."""
  setting = (setting or "auto").strip()
  if setting == "system":
    return None
  if setting == "auto":
    return next((path for path in map(find, PREFERENCE) if path), None)
  if setting in _BY_NAME:
    path = find(_BY_NAME[setting])
    if path is None:
      raise AllocatorError(f"{ENV}={setting}: {setting} is not installed (try "
                           f"{ENV}=auto or {ENV}=system)")
    return path
  if os.path.isfile(setting):
    return setting
  raise AllocatorError(f"{ENV}={setting!r}: expected auto, system, one of "
                       f"{', '.join(_BY_NAME)}, or the path of a shared library")


def preload_environment(path: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """The variables that preload the library at `path` into a process started with `environ`,
  with its allocator's settings where `environ` does not set them already."""
  env = {"LD_PRELOAD": ":".join(p for p in (path, environ.get("LD_PRELOAD")) if p)}
  for allocator in PREFERENCE:
    if os.path.basename(path).startswith(allocator.library):
      env.update((k, v) for k, v in allocator.settings if k not in environ)
  return env


def running() -> str:
  """The allocator this process runs under: a name from PREFERENCE, the file name of the library
  DMJAX_ALLOCATOR gave, or 'system'."""
  try:
    with open("/proc/self/maps") as maps:
      mapped = maps.read()
  except OSError:  # Not Linux.
    return "system"
  for allocator in PREFERENCE:
    if f"/{allocator.library}" in mapped:
      return allocator.name
  given = os.environ.get(_REEXECUTED_ENV)
  return os.path.basename(given) if given and os.path.realpath(given) in mapped else "system"


def describe() -> str:
  """The allocator in a few words, for the device banner."""
  name = running()
  if name != "system":
    return name
  if os.environ.get(ENV, "auto") == "system":
    return f"the system's malloc ({ENV}=system)"
  return f"the system's malloc (none of {', '.join(_BY_NAME)} preloaded)"


def run_command() -> None:
  """Re-executes this process (a dmjax command) under the chosen allocator, if it is not
  already running under one; returns if there is nothing to do. Not for library code."""
  if not sys.platform.startswith("linux") or _REEXECUTED_ENV in os.environ:
    return
  if running() != "system":
    return
  try:
    path = choose(os.environ.get(ENV))
  except AllocatorError as e:
    raise SystemExit(f"error: {e}") from None
  if path is None:
    return
  env = dict(os.environ, **preload_environment(path), **{_REEXECUTED_ENV: path})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def is_command() -> bool:
  """Whether this process is a dmjax command: `python -m dmjax.X` (while Python imports the
  package to find X, sys.argv[0] is '-m') or a `dmjax-X` script."""
  program = sys.argv[0] if sys.argv else ""
  return program == "-m" or os.path.basename(program).startswith("dmjax-")
