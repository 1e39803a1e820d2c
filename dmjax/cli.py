"""One command-line style for every dmjax command: absl flags.

  --name=value  --flag / --noflag  --config=FILE[:ARG] --config.key=value  --help

Each command defines its flags on a `flags.FlagValues` of its own (`run`), not on absl's global
`FLAGS`: commands are importable and callable together (`predict.main([...])` in a test or a
notebook) without their `--workdir` flags clashing. absl's own logging flags (`--verbosity`,
`--log_dir`, ...) still work: they stay on the global `FLAGS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags, logging

from dmjax import errors

# The user's to fix, and reported on one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError, FileNotFoundError, errors.NonFiniteLossError)


def _start_logging() -> None:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  if logging.get_verbosity() > logging.INFO:
    logging.set_verbosity(logging.INFO)


def run(doc: str, define_flags: Callable[[flags.FlagValues, list[str]], None],
        main: Callable[[flags.FlagValues], None], argv: Sequence[str] | None = None,
        *, program: str) -> None:
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
    raise SystemExit(f"error: {e} (see {program} --help)") from None
  if len(rest) > 1:
    raise SystemExit(f"error: unexpected arguments {rest[1:]} (see {program} --help)")
  _start_logging()
  try:
    main(flag_values)
  except USER_ERRORS as e:
    logging.debug("Traceback:", exc_info=True)
    raise SystemExit(f"error: {e}") from None
