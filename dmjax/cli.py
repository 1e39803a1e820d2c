"""One command-line style for every dmjax command: absl flags.

  --name=value  --flag / --noflag  --config=FILE[:ARG] --config.key=value  --help

Each command defines its flags on a `flags.FlagValues` of its own (`run`), not on absl's global
`FLAGS`: commands are importable and callable together (`predict.main([...])` in a test or a
notebook) without their `--workdir` flags clashing. absl's own logging flags (`--verbosity`,
`--log_dir`, ...) still work: they stay on the global `FLAGS`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import flags, logging

from dmjax import errors, parallel, progress

# The user's to fix, and reported on one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError, FileNotFoundError, errors.NonFiniteLossError)


COMPILATION_CACHE_HELP = (
    "Keep compiled XLA programs in JAX's persistent compilation cache, in the user's cache "
    "folder ($XDG_CACHE_HOME or ~/.cache, then dmjax/jax; $JAX_COMPILATION_CACHE_DIR if set), so "
    "that a second start compiles nothing it compiled before; --nocompilation_cache: off.")


def define_compilation_cache_flag(f: flags.FlagValues) -> None:
  flags.DEFINE_bool("compilation_cache", True, COMPILATION_CACHE_HELP, flag_values=f)


def compilation_cache_dir() -> str:
  """Where the commands keep compiled programs: $JAX_COMPILATION_CACHE_DIR, else the user's
  cache folder."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dmjax", "jax")


def use_compilation_cache(enabled: bool = True) -> str | None:
  """Turns JAX's persistent compilation cache on (`compilation_cache_dir`) or off, before the
  first compilation; returns its folder, or None when off. Every program is kept, however fast
  it compiled (JAX's default keeps only those over a second): a warm-up compiles dozens of
  small ones, which together are what a restart would wait for
  ($JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, if set, wins)."""
  import jax  # noqa: PLC0415 (commands that never compile need not import it)

  folder = compilation_cache_dir() if enabled else None
  jax.config.update("jax_compilation_cache_dir", folder)
  if enabled and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return folder


def _start_logging(info_logs: bool) -> None:
  logging.use_absl_handler()
  # absl's default shows warnings only; a command that reports its progress in its log (training,
  # the benchmark) shows INFO too, as under `absl.app.run`, unless --verbosity says otherwise.
  if info_logs and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)


def _one_line(message: str) -> str:
  """A multi-line error (a config file's traceback, say) as its first and last lines."""
  message = message.replace(f"{errors.UserError.__module__}.UserError: ", "")
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  return lines[0] if len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"


def run(doc: str, define_flags: Callable[[flags.FlagValues, list[str]], None],
        main: Callable[[flags.FlagValues], None], argv: Sequence[str] | None = None,
        *, program: str, info_logs: bool = False) -> None:
  """Parses `argv` (default: the command line, without the program) and calls `main(flags)`.

  `define_flags(flag_values, argv)` defines the command's flags; `argv` is what a config flag
  reads its `--config.key=value` overrides from. Bad flags and `USER_ERRORS` exit with one line.
  """
  argv = [program, *(sys.argv[1:] if argv is None else argv)]
  if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
    flag_values = flags.FlagValues()
    define_flags(flag_values, argv)
    print(f"{doc.rstrip()}\n\nFlags:\n{flag_values.get_help()}")
    raise SystemExit(0)
  # absl's logging flags first; what they do not know is the command's.
  argv = flags.FLAGS(argv, known_only=True)
  flag_values = flags.FlagValues()
  define_flags(flag_values, argv)
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    raise SystemExit(f"error: {_one_line(str(e))} (see {program} --help)") from None
  except AttributeError as e:  # A --config.KEY override of a key the config does not have.
    raise SystemExit(f"error: a --config.KEY override: the config has no key {e} (see "
                     f"{program} --help)") from None
  for name in flag_values:
    error = getattr(flag_values[name].value, "_error", None)  # A config file that did not load.
    if isinstance(error, Exception):
      raise SystemExit(f"error: --{name}={flag_values[name].serialize().split('=', 1)[-1]}: "
                       f"{_one_line(str(error))}")
  if len(rest) > 1:
    raise SystemExit(f"error: unexpected arguments {rest[1:]} (see {program} --help)")
  _start_logging(info_logs)
  if not parallel.distributed_requested(getattr(flag_values, "distributed", False)):
    progress.device_banner()  # A multi-process run must first join (dmjax.main), then look.
  try:
    main(flag_values)
  except USER_ERRORS as e:
    logging.debug("Traceback:", exc_info=True)
    raise SystemExit(f"error: {e}") from None
