"""ONNX for people outside JAX (onnxruntime on servers, phones, browsers), converted by jax2onnx.

  pip install -c constraints.txt -e ".[onnx]"      # jax2onnx 0.13.0 and onnxruntime
  python -m dmjax.export --workdir=DIR --out=model.onnx [--size=H,W]

The ONNX model is `exported.inference_function`: uint8 RGB photos `bg`, `fg_bg` of shape
(B, H, W, 3) in, `mask` and `depth` float32 (B, H, W, 1) in [0, 1] out. The batch is symbolic
(or 1, with a warning, where jax2onnx cannot convert a symbolic one); height and width are fixed
(the run's training size unless `--size`): jax2onnx 0.13.0 cannot convert this project's models
with symbolic height and width. The metadata of the `.jaxexport` file is in the ONNX model's
`metadata_props`, each value JSON.

What jax2onnx 0.13.0 converts (jax 0.10.2, flax 0.12.8): depthmasknet_v2 without a refiner and
depthmasknet. It refuses the refined models and u2netp_dual (an antialiased `jax.image.resize`:
"resize with antialias=True is not supported yet"; 0.17.1 converts it only as a dense matrix of
at most a million weights, smaller than a 32 px image needs), unet_dual and two_stage (errors in
its transposed-convolution and max-pool handlers). Later jax2onnx releases (0.13.1 on) require
orbax-checkpoint < 0.11.37, older than this project's; hence the pin.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as logging_lib
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax import export as jax_export

import dmjax
from dmjax import checkpoints, errors, files, models
from dmjax.inference import exported
from dmjax.inference.predictor import size_multiple
from dmjax.models import refiner

INSTALL = 'pip install -c constraints.txt -e ".[onnx]"'
INPUT_NAMES = ("bg", "fg_bg")
OUTPUT_NAMES = ("mask", "depth")


def _jax2onnx():
  try:
    import jax2onnx  # noqa: PLC0415 (an optional extra)
  except ImportError as e:
    raise errors.UserError(f"ONNX export needs jax2onnx ({e}); install it with {INSTALL}") from None
  return jax2onnx


def convert(model, variables, *, height: int, width: int, model_name: str, metadata: dict):
  """(ONNX ModelProto, its metadata) of `model` at (height, width), any batch size (or, where
  jax2onnx cannot convert a symbolic batch, batch 1; the metadata's "batch" says which)."""
  jax2onnx = _jax2onnx()
  import onnx  # noqa: PLC0415 (installed with jax2onnx)

  multiple = size_multiple(model)
  if height % multiple or width % multiple:
    raise errors.UserError(f"size {height}x{width}: {model_name} needs multiples of {multiple}")
  function = exported.inference_function(model, variables)
  if isinstance(model, refiner.Refined):
    model_name = f"{model_name} with a refiner"
  first_error = None
  for batch in ("B", 1):
    spec = jax.ShapeDtypeStruct(jax_export.symbolic_shape(f"{batch}, {height}, {width}, 3"),
                                np.uint8)
    # jax2onnx prints its progress to stdout and logs a warning per untyped shape value, and
    # tracebacks of plugins this JAX lacks (dm_pix's, which these models do not use).
    with contextlib.redirect_stdout(io.StringIO()), _quiet("jax2onnx", "onnx_ir"):
      try:
        proto = jax2onnx.to_onnx(function, [spec, spec], model_name=model_name,
                                 input_names=INPUT_NAMES, output_names=OUTPUT_NAMES)
        break
      except Exception as e:  # A primitive or shape jax2onnx does not handle.
        first_error, error = first_error or e, e
  else:
    raise errors.UserError(f"jax2onnx {_version('jax2onnx')} cannot convert {model_name} "
                           f"({exported.first_line(error)}); use the .jaxexport file instead "
                           "(README, Export)")
  if first_error is not None:
    logging.warning("jax2onnx cannot convert %s with a symbolic batch (%s): its ONNX model takes "
                    "batches of 1", model_name, exported.first_line(first_error))
  metadata = {**metadata, "batch": "any" if batch == "B" else batch}
  onnx.helper.set_model_props(proto, {key: json.dumps(value, sort_keys=True)
                                      for key, value in metadata.items()})
  return proto, metadata


def export_run(workdir: str, path: str, *, step: int | None = None,
               size: Sequence[int] | None = None, overwrite: bool = False) -> dict:
  """Writes `workdir`'s latest (or `step`) checkpoint to `path` as ONNX; returns its metadata."""
  if not overwrite and os.path.exists(path):
    raise errors.UserError(f"{path} exists; choose another --out or pass --overwrite")
  _jax2onnx()  # Before restoring: a missing extra is the user's first thing to fix.
  config, variables, step = checkpoints.restore_model(workdir, step)
  model = models.create_model(config.model)
  resolution = int(config.data.resolution)
  height, width = size or (resolution, resolution)
  metadata = {
      "model": config.model.name,
      "model_config": json.loads(config.model.to_json()),
      "checkpoint_step": step,
      "resolution_policy": {"training_resolution": resolution, "fixed_size": [height, width],
                            "size_multiple": size_multiple(model),
                            "fit": f"the whole model at {height}x{width} only: resize photos to "
                                   "it and the outputs back"},
      "inputs": "bg, fg_bg: uint8 RGB photos of shape (B, H, W, 3)",
      "outputs": ("mask, depth: float32 (B, H, W, 1) in [0, 1]; mask is the object's "
                  "probability, depth 0 = nearest"),
      "normalization": exported.normalization_metadata(),
      "dmjax_version": dmjax.__version__,
      "jax_version": jax.__version__,
      "jax2onnx_version": _version("jax2onnx"),
  }
  proto, metadata = convert(model, variables, height=height, width=width,
                            model_name=config.model.name, metadata=metadata)
  with files.atomic_open(path) as f:
    f.write(proto.SerializeToString())
  return metadata


@contextlib.contextmanager
def _quiet(*loggers: str):
  saved = {name: logging_lib.getLogger(name).level for name in loggers}
  for name in loggers:
    logging_lib.getLogger(name).setLevel(logging_lib.ERROR)
  try:
    yield
  finally:
    for name, level in saved.items():
      logging_lib.getLogger(name).setLevel(level)


def _version(package: str) -> str:
  from importlib import metadata  # noqa: PLC0415

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "(not installed)"
