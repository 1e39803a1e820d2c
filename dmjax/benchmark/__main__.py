"""`python -m dmjax.benchmark --config=configs/r64.py [--what=step,...]` (or `dmjax-benchmark`):
the rows of `dmjax.benchmark`, one JSON line each on stdout. Run `--help` for every flag."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from dmjax import benchmark, cli
from dmjax.benchmark.settings import Settings

_DEFINE = {"list[str]": flags.DEFINE_list, "int": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "bool": flags.DEFINE_bool, "str": flags.DEFINE_string,
           "str | None": flags.DEFINE_string}


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file("config", None, "Configuration file.", flag_values=f,
                                  lock_config=False, sys_argv=argv)
  flags.mark_flag_as_required("config", flag_values=f)
  for field in dataclasses.fields(Settings):
    default = field.default_factory() if callable(field.default_factory) else field.default
    _DEFINE[str(field.type)](field.name, default, field.metadata["help"], flag_values=f)


def benchmark_with_flags(f: flags.FlagValues) -> None:
  # Set before JAX starts its backend. Without it JAX takes 75% of GPU memory up front: PyTorch
  # in the same process would starve, and the peak memory in use would read as that 75%.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # Read by PyTorch's OpenMP runtime when torch is imported. Its default spins at barriers: on a
  # shared host (another process on a core) that made its steps 3-5x slower, which is not
  # PyTorch's speed but a scheduling accident; sleeping threads lose little when a core is free.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  settings = Settings(**{field.name: f[field.name].value for field in dataclasses.fields(Settings)})
  config_name = config_flags.get_config_filename(f["config"])
  for row in benchmark.run(f.config, settings, config_name):
    print(json.dumps(row), flush=True)
  if "tensorflow" in sys.modules:
    logging.warning("TensorFlow was imported; the accelerator machines cannot run it.")


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, benchmark_with_flags, argv, program="dmjax-benchmark",
          info_logs=True)


if __name__ == "__main__":
  main()
