"""A trained run as one file that runs without dmjax's model code.

  python -m dmjax.export --workdir=DIR --out=model.jaxexport [--step=N] [--platforms=cpu,cuda]
  python -m dmjax.export --workdir=DIR --out=model.onnx [--size=H,W]

`.jaxexport` (any name not ending in .onnx, or --format=jax): a `jax.export` serialization of
the model for CPU and CUDA, any batch size and any height and width that are multiples of 16
(32 with a refiner), with its metadata (model, checkpoint step, resolution policy, input
normalisation, versions) in a JSON header; it runs with jax and numpy alone
(`dmjax.inference.exported.load`), or as `Predictor.from_exported` and `dmjax.predict
--exported=FILE`. `.onnx` (or --format=onnx): the same function converted by jax2onnx, any
batch size at one fixed height and width (`--size`, default the run's training size); needs the
`onnx` extra and converts only some models (`dmjax.inference.onnx_export`). Both take uint8 RGB
photos and return the mask probability and depth in [0, 1]. An existing --out is never replaced
without --overwrite.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from dmjax import cli, errors
from dmjax.inference import exported

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=f, required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=f)
  flags.DEFINE_string("out", None, "The file to write.", flag_values=f, required=True)
  flags.DEFINE_enum("format", None, ("jax", "onnx"), "jax: a jax.export file; onnx: ONNX "
                    "(default: onnx when --out ends in .onnx, else jax).", flag_values=f)
  flags.DEFINE_list("platforms", list(exported.PLATFORMS), "jax format: the platforms to lower "
                    f"for, of {PLATFORMS}.", flag_values=f)
  flags.DEFINE_list("size", None, "onnx format: H,W of the fixed input size (default: the run's "
                    "training resolution).", flag_values=f)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=f)


def _size(values: list[str] | None) -> tuple[int, int] | None:
  if values is None:
    return None
  try:
    height, width = (int(v) for v in values)
    if height < 1 or width < 1:
      raise ValueError
  except ValueError:
    raise errors.UserError(f"--size={','.join(values)}: expected two positive integers H,W") \
        from None
  return height, width


def export(f: flags.FlagValues) -> None:
  kind = f.format or ("onnx" if f.out.lower().endswith(".onnx") else "jax")
  if os.path.exists(f.out) and not f.overwrite:
    raise errors.UserError(f"{f.out} exists; choose another --out or pass --overwrite")
  if os.path.dirname(f.out):
    os.makedirs(os.path.dirname(f.out), exist_ok=True)
  if kind == "onnx":
    from dmjax.inference import onnx_export  # noqa: PLC0415 (imports the optional jax2onnx)

    metadata = onnx_export.export_run(f.workdir, f.out, step=f.step, size=_size(f.size),
                                      overwrite=f.overwrite)
    height, width = metadata["resolution_policy"]["fixed_size"]
    batch = "B" if metadata["batch"] == "any" else metadata["batch"]
    print(f"Wrote {f.out}: {metadata['model']} at step {metadata['checkpoint_step']}, inputs bg "
          f"and fg_bg uint8 ({batch}, {height}, {width}, 3), {os.path.getsize(f.out):,} bytes")
    return
  if f.size is not None:
    raise errors.UserError("--size is for --format=onnx; a jax.export file takes any size the "
                           "model allows")
  unknown = sorted(set(f.platforms) - set(PLATFORMS))
  if unknown or not f.platforms:
    raise errors.UserError(f"--platforms={','.join(f.platforms)}: expected some of {PLATFORMS}")
  model = exported.export_run(f.workdir, f.step, platforms=f.platforms)
  exported.save(model, f.out, overwrite=f.overwrite)
  metadata = model.metadata
  print(f"Wrote {f.out}: {metadata['model']} at step {metadata['checkpoint_step']} for "
        f"{', '.join(metadata['platforms'])}, inputs bg and fg_bg uint8 "
        f"({metadata['input_shape']}), {os.path.getsize(f.out):,} bytes")


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, export, argv, program="dmjax-export")


if __name__ == "__main__":
  main()
