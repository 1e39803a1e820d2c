"""A trained model as one file that runs wherever JAX runs, without Flax or dmjax's model code.

  python -m dmjax.export --workdir=workdirs/r64 --out=r64.jaxexport
  model = exported.load("r64.jaxexport")        # needs only jax and numpy
  mask, depth = model(bg, fg_bg)                 # uint8 (B, H, W, 3) in, float32 (B, H, W, 1) out

The file holds a `jax.export` serialization (StableHLO with the weights inside, lowered for CPU
and CUDA) of the whole model at the input's size: uint8 RGB photos in, normalised inside, the
mask probability and depth (0 = nearest) in [0, 1] out, as `models.predict_probabilities` gives
them. Batch, height and width are symbolic (height and width multiples of the model's size
multiple: 16, or 32 with a refiner); a model that cannot be exported so is exported at its
training size instead, and the file says so.

File layout (`head -2 FILE` shows the header):

  dmjax-exported-model 1\\n         magic and format version
  {"model": ..., ...}\\n             metadata, one line of JSON (`METADATA_KEYS`)
  <payload_size bytes>              `jax.export.Exported.serialize()`, its SHA-256 in metadata

This module imports only jax, numpy and dmjax's dependency-free `errors`: `load` and
`ExportedModel` work where Flax (or PIL) is not installed. `export_model` imports the model code
when called. Without dmjax at all, the README's "Export" section reads the file in a few lines.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

import dmjax
from dmjax import errors

MAGIC = b"dmjax-exported-model"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda")
# What every file's metadata holds (`export_model` writes them, `load` checks they are there).
METADATA_KEYS = ("model", "refiner", "checkpoint_step", "resolution_policy", "input_shape",
                 "inputs", "outputs", "normalization", "platforms", "dmjax_version",
                 "jax_version", "payload_size", "payload_sha256")
# What `load` checks each value (and the resolution policy's) to be, in JSON's words; "count" is
# an integer that is not a boolean, "size" [height, width] counts.
METADATA_TYPES = {
    "model": "string", "refiner": "boolean", "checkpoint_step": "count or null",
    "resolution_policy": "object", "input_shape": "string", "inputs": "string",
    "outputs": "string", "normalization": "object", "platforms": "array of strings",
    "dmjax_version": "string", "jax_version": "string", "payload_size": "count",
    "payload_sha256": "string", "run": "string or null", "model_config": "object or null"}
RESOLUTION_POLICY_TYPES = {"training_resolution": "count", "size_multiple": "count",
                           "fixed_size": "size or null"}


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A `jax.export.Exported` inference function and what the file says about it."""

  exported: jax_export.Exported
  metadata: dict[str, Any]
  path: str = "<exported model>"

  @property
  def size_multiple(self) -> int:
    return int(self.metadata["resolution_policy"]["size_multiple"])

  @property
  def fixed_size(self) -> tuple[int, int] | None:
    """(height, width) the file only runs at, or None when any multiple of `size_multiple` runs."""
    size = self.metadata["resolution_policy"]["fixed_size"]
    return None if size is None else (int(size[0]), int(size[1]))

  @functools.cached_property
  def _call(self) -> Callable:
    # One compilation per distinct input shape, as for any jitted function.
    return jax.jit(self.exported.call)

  def __call__(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask probability and depth, float32 (B, H, W, 1), for uint8 RGB batches (B, H, W, 3)."""
    bg, fg_bg = np.asarray(bg), np.asarray(fg_bg)
    self.check_inputs(bg, fg_bg)
    mask, depth = self._call(bg, fg_bg)
    return np.asarray(mask), np.asarray(depth)

  def check_inputs(self, bg: np.ndarray, fg_bg: np.ndarray) -> None:
    """A one-line UserError for inputs the exported function would refuse less clearly."""
    for name, image in (("bg", bg), ("fg_bg", fg_bg)):
      if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise errors.UserError(f"{self.path}: {name} must be uint8 RGB of shape (B, H, W, 3); "
                               f"got {image.dtype} {image.shape}")
    if bg.shape != fg_bg.shape:
      raise errors.UserError(f"{self.path}: bg has shape {bg.shape} but fg_bg {fg_bg.shape}")
    height, width = bg.shape[1:3]
    if self.fixed_size is not None and (height, width) != self.fixed_size:
      raise errors.UserError(f"{self.path}: exported at a fixed size of {self.fixed_size[0]}x"
                             f"{self.fixed_size[1]}; got {height}x{width}")
    if height % self.size_multiple or width % self.size_multiple:
      raise errors.UserError(f"{self.path}: height and width must be multiples of "
                             f"{self.size_multiple}; got {height}x{width}")


# ---- Exporting (imports the model code; not needed to load).


def inference_function(model, variables) -> Callable[[jax.Array, jax.Array], tuple]:
  """uint8 (B, H, W, 3) photo pairs → (mask, depth) probabilities, the weights as constants.

  The photos are normalised inside (`schema.normalize_photo`'s multiply-add), so the exported
  function takes what a camera or an image file gives.
  """
  from dmjax import models  # noqa: PLC0415 (Flax; loading must not need it)
  from dmjax.data import schema  # noqa: PLC0415 (PIL)

  variables = jax.tree.map(np.asarray, variables)
  scales = {key: schema.photo_normalization(key) for key in schema.IMAGE_KEYS}

  def normalize(image: jax.Array, key: str) -> jax.Array:
    scale, offset = scales[key]
    return image.astype(np.float32) * scale + offset

  def infer(bg: jax.Array, fg_bg: jax.Array) -> tuple[jax.Array, jax.Array]:
    return models.predict_probabilities(model, variables, normalize(bg, "bg"),
                                        normalize(fg_bg, "fg_bg"))

  return infer


def normalization_metadata() -> dict:
  from dmjax.data import schema  # noqa: PLC0415 (PIL)

  return {"where": "inside the exported function: give uint8 photos",
          "formula": "(x / 255 - mean[key]) / std[key], per RGB channel",
          "mean": {key: list(schema.PHOTO_MEAN[key]) for key in schema.IMAGE_KEYS},
          "std": {key: list(schema.PHOTO_STD[key]) for key in schema.IMAGE_KEYS}}


def _input_specs(shape) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  spec = jax.ShapeDtypeStruct(shape, np.uint8)
  return spec, spec


def export_model(model, variables, *, model_name: str, resolution: int, step: int | None = None,
                 platforms: Sequence[str] = PLATFORMS, symbolic: bool = True,
                 extra_metadata: dict | None = None) -> ExportedModel:
  """`jax.export` of `inference_function(model, variables)` with its metadata.

  Batch, height and width are symbolic (height and width `size_multiple`·h and ·w); where the
  model cannot be traced so (or `symbolic` is False), they are fixed at `resolution` square,
  batch still symbolic, and a log line says why.
  """
  from absl import logging  # noqa: PLC0415

  from dmjax.inference import predictor  # noqa: PLC0415
  from dmjax.models import refiner  # noqa: PLC0415

  function = jax.jit(inference_function(model, variables))
  multiple = predictor.size_multiple(model)
  export = jax_export.export(function, platforms=tuple(platforms))
  exported, fixed_size = None, None
  if symbolic:
    shape = jax_export.symbolic_shape(f"b, {multiple}*h, {multiple}*w, 3")
    try:
      exported = export(*_input_specs(shape))
    except Exception as e:  # Whatever the model's code does with a symbolic size.
      logging.warning("%s cannot be exported with symbolic height and width (%s); exporting "
                      "at its training size %dx%d instead", model_name, first_line(e),
                      resolution, resolution)
  if exported is None:
    fixed_size = (resolution, resolution)
    exported = export(*_input_specs(jax_export.symbolic_shape(f"b, {resolution}, "
                                                              f"{resolution}, 3")))
  metadata = {
      "model": model_name,
      "refiner": isinstance(model, refiner.Refined),
      "checkpoint_step": step,
      "resolution_policy": {
          "training_resolution": resolution,
          "size_multiple": multiple,
          "fixed_size": fixed_size,
          "fit": ("the whole model at the input's own size (Predictor fit=pad); pad or resize "
                  f"photos to multiples of {multiple}" if fixed_size is None else
                  f"the whole model at {resolution}x{resolution} only (Predictor fit=resize)"),
      },
      "input_shape": ", ".join(str(d) for d in exported.in_avals[0].shape),
      "inputs": "bg, fg_bg: uint8 RGB photos of the same shape (B, H, W, 3)",
      "outputs": ("mask, depth: float32 (B, H, W, 1) in [0, 1]; mask is the object's "
                  "probability, depth 0 = nearest"),
      "normalization": normalization_metadata(),
      "platforms": list(exported.platforms),
      "dmjax_version": dmjax.__version__,
      "jax_version": jax.__version__,
      **(extra_metadata or {}),
  }
  return ExportedModel(exported, metadata)


def export_run(workdir: str, step: int | None = None, *, platforms: Sequence[str] = PLATFORMS,
               symbolic: bool = True) -> ExportedModel:
  """`export_model` of a training run's latest (or `step`) checkpoint."""
  from dmjax import checkpoints, models  # noqa: PLC0415

  config, variables, step = checkpoints.restore_model(workdir, step)
  return export_model(models.create_model(config.model), variables, model_name=config.model.name,
                      resolution=int(config.data.resolution), step=step, platforms=platforms,
                      symbolic=symbolic,
                      # The run's name, not its path: a file that is shared must not carry
                      # the exporter's folders (user names, mount points).
                      extra_metadata={"model_config": json.loads(config.model.to_json()),
                                      "run": os.path.basename(os.path.normpath(workdir))})


def save(model: ExportedModel, path: str, *, overwrite: bool = False) -> None:
  """Writes the file atomically; refuses to replace an existing one unless `overwrite`."""
  from dmjax import files  # noqa: PLC0415 (PIL; loading must not need it)

  if os.path.exists(path) and not overwrite:
    raise errors.UserError(f"{path} exists; choose another --out or pass --overwrite")
  payload = bytes(model.exported.serialize())
  metadata = {**model.metadata, "payload_size": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
  header = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
  with files.atomic_open(path) as f:
    f.write(MAGIC + b" %d\n" % FORMAT_VERSION)
    f.write(header + b"\n")
    f.write(payload)


# ---- Loading (jax and numpy only).


def read(path: str) -> tuple[dict[str, Any], bytes]:
  """(metadata, payload) of a file, checked: a one-line UserError for anything else."""
  try:
    with open(path, "rb") as f:
      # The first line alone, bounded, so that a large file of another kind is not read whole.
      magic, _, version = f.readline(len(MAGIC) + 16).rstrip(b"\n").partition(b" ")
      if magic != MAGIC:
        raise errors.UserError(f"{path}: not a dmjax exported model (it does not start with "
                               f"{MAGIC.decode()!r}); write one with python -m dmjax.export")
      if version != b"%d" % FORMAT_VERSION:
        raise errors.UserError(f"{path}: format version {version.decode(errors='replace')!r}; "
                               f"this dmjax reads version {FORMAT_VERSION}")
      header, newline, payload = f.read().partition(b"\n")
  except OSError as e:
    raise errors.UserError(f"{path}: cannot read it ({e.strerror or e})") from None
  try:
    if not newline:
      raise ValueError("no end of line")
    metadata = json.loads(header)
    if not isinstance(metadata, dict):
      raise ValueError("not a JSON object")
  except ValueError as e:
    raise errors.UserError(f"{path}: corrupt metadata line ({e}); the file is damaged or "
                           "truncated") from None
  missing = [key for key in METADATA_KEYS if key not in metadata]
  if missing:
    raise errors.UserError(f"{path}: metadata lacks {', '.join(missing)}; the file is damaged")
  check_metadata_types(metadata, path)
  if len(payload) != metadata["payload_size"]:
    raise errors.UserError(f"{path}: truncated or damaged: {len(payload)} bytes of model where "
                           f"the header says {metadata['payload_size']}")
  if hashlib.sha256(payload).hexdigest() != metadata["payload_sha256"]:
    raise errors.UserError(f"{path}: damaged: the model's bytes do not match their SHA-256 in "
                           "the header")
  return metadata, payload


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "a boolean"
  if isinstance(value, (int, float)):
    return f"the number {value}"
  if isinstance(value, str):
    return "a string"
  return "an array" if isinstance(value, list) else "an object"


def _is(value: Any, expected: str) -> bool:
  is_count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
  return any({
      "string": lambda: isinstance(value, str),
      "boolean": lambda: isinstance(value, bool),
      "count": lambda: is_count(value),
      "object": lambda: isinstance(value, dict),
      "null": lambda: value is None,
      "array of strings": lambda: (isinstance(value, list)
                                   and all(isinstance(x, str) for x in value)),
      "size": lambda: (isinstance(value, list) and len(value) == 2
                       and all(is_count(x) and x > 0 for x in value)),
  }[kind]() for kind in expected.split(" or "))


def check_metadata_types(metadata: dict[str, Any], path: str) -> None:
  """A one-line UserError naming the first value of `METADATA_TYPES` (or the resolution
  policy's) of the wrong type: a `null` where an object belongs fails here, not later."""
  checks = [(key, metadata[key], expected) for key, expected in METADATA_TYPES.items()
            if key in metadata]
  if isinstance(metadata.get("resolution_policy"), dict):
    policy = metadata["resolution_policy"]
    checks += [(f"resolution_policy.{key}", policy.get(key), expected)
               for key, expected in RESOLUTION_POLICY_TYPES.items()]
  words = {"string": "a string", "boolean": "true or false", "count": "a whole number",
           "object": "an object", "null": "null", "array of strings": "an array of strings",
           "size": "[height, width]"}
  for key, value, expected in checks:
    if not _is(value, expected):
      wanted = " or ".join(words[kind] for kind in expected.split(" or "))
      raise errors.UserError(f"{path}: metadata {key} is {_json_type(value)}, not {wanted}; the "
                             "file is damaged or not from dmjax.export")


def load(path: str, *, expect_model: str | None = None) -> ExportedModel:
  """The exported model in `path`; with `expect_model`, refuses a file of another model."""
  metadata, payload = read(path)
  if expect_model is not None and metadata["model"] != expect_model:
    raise errors.UserError(f"{path}: exported from model {metadata['model']!r}, not "
                           f"{expect_model!r}")
  try:
    exported = jax_export.deserialize(bytearray(payload))
  except Exception as e:  # flatbuffers and jax raise assorted errors on bytes they cannot read.
    raise errors.UserError(f"{path}: JAX {jax.__version__} cannot read the model it holds (written "
                           f"with JAX {metadata['jax_version']}): {first_line(e)}") from None
  platform = jax.default_backend()
  if platform not in exported.platforms and not (platform == "gpu" and
                                                 {"cuda", "rocm"} & set(exported.platforms)):
    raise errors.UserError(f"{path}: exported for {', '.join(exported.platforms)}, not for this "
                           f"machine's {platform}; export it again with --platforms")
  in_avals = exported.in_avals
  if (len(in_avals) != 2 or any(a.dtype != np.uint8 or len(a.shape) != 4 for a in in_avals)
      or len(exported.out_avals) != 2):
    raise errors.UserError(f"{path}: holds a function of {len(in_avals)} inputs "
                           f"{[str(a) for a in in_avals]}, not a dmjax model's two uint8 photos")
  return ExportedModel(exported, metadata, path)


def first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
