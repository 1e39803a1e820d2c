"""`Predictor`: a trained model that predicts mask and depth for photo pairs of any size.

  predictor = Predictor.from_workdir("workdirs/r64")
  mask, depth = predictor(bg, fg_bg)   # float32 in [0, 1], (H, W) or (B, H, W)

Inputs are numpy arrays, uint8 or [0, 1] floats, (H, W, C) or batches (B, H, W, C). This module
needs no TensorFlow and no TFDS.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from dmjax import checkpoints, errors, models
from dmjax.data import schema
from dmjax.inference import cascade as cascade_lib
from dmjax.inference import exported as exported_lib
from dmjax.models import layers, refiner

FITS = ("auto", "resize", "pad")
FIT_HELP = ("auto: at the photo's own size, whole photo then object window; resize: squeezed to "
            "the run's resolution; pad: the model at the photo's size.")
CLEAN_MASK_HELP = ("With fit=auto: fill the mask's small holes and drop its stray pieces "
                   "(dmjax.inference.mask_cleanup); --noclean_mask: the mask as the model gave it.")


class Prediction(NamedTuple):
  mask: np.ndarray  # Probability of the object, float32 in [0, 1].
  depth: np.ndarray  # Float32 in [0, 1], 0 = nearest.


def as_uint8_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 or [0, 1] float → uint8 (H, W, 3)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise errors.UserError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
                           f"got shape {image.shape}")
  if image.dtype != np.uint8:
    if not np.issubdtype(image.dtype, np.floating):
      raise errors.UserError(f"{what}: expected uint8 or float in [0, 1], got {image.dtype}")
    # The model was trained on 8-bit photos; rounding to them loses nothing it could use.
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]  # Alpha dropped: a composite's pixels are what the camera saw.


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  resized = schema.resize_whole_frame(values[..., None], size[1], size[0])[..., 0]
  return np.clip(resized, 0.0, 1.0)


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
  height, width = image.shape[:2]
  pad_height, pad_width = -height % multiple, -width % multiple
  # Repeated edge pixels, so the padding adds no edge the model could mistake for an object.
  return np.pad(image, ((0, pad_height), (0, pad_width), (0, 0)), mode="edge")


def size_multiple(model) -> int:
  """What the whole model needs height and width to be multiples of (`fit="pad"`)."""
  return layers.SIZE_MULTIPLE * refiner.input_factor(model)


@dataclasses.dataclass
class Predictor:
  """A trained model that predicts at any image size: `Predictor.from_workdir(workdir)`.

  `fit` is how a photo meets the model:
    auto    (default) at the photo's own size: the model on the whole photo and then on a window
            around the object, each at a working size where objects look as in training, with
            a refined model's refiner step (`dmjax.inference.cascade`); sharp edges at any
            size, at a cost that hardly grows with the photo. The mask's small holes are filled
            and its stray pieces dropped (`dmjax.inference.mask_cleanup`) unless `clean_mask`
            is False.
    resize  squeezed to the run's square training resolution, outputs resized back.
    pad     the whole model at the photo's own size, padded to the size multiple it needs.

  `Predictor.from_exported(file)` runs a `dmjax.export` file instead (no model code): all three
  where the file has symbolic sizes; a file exported at a fixed size runs `resize` (`auto` there
  means `resize`).
  """

  model: Any
  variables: Any
  resolution: int
  step: int = 0
  fit: str = "auto"
  batch_size: int = 8
  config: Any = None  # The run's config, when it came from a workdir.
  clean_mask: bool = True  # fit="auto" only.
  exported: exported_lib.ExportedModel | None = None  # Instead of model and variables.

  def __post_init__(self):
    if self.fit not in FITS:
      raise errors.UserError(f"fit={self.fit!r}: expected one of {FITS}")
    if self.batch_size < 1:
      raise errors.UserError(f"batch_size={self.batch_size}: expected at least 1")
    if self.exported is not None:
      # The exported function normalises uint8 photos itself (`_model_input`).
      self._forward = lambda _, bg, fg_bg: self.exported(bg, fg_bg)
      self._multiple = self.exported.size_multiple
      if self.exported.fixed_size is not None:  # Its one size is all "auto" could give it.
        self.fit, self._cascade = "resize" if self.fit == "auto" else self.fit, None
        return
      factor = refiner.REFINE_FACTOR if self.exported.metadata["refiner"] else 1
      self._cascade = cascade_lib.Cascade(functools.partial(_exported_logits, self.exported),
                                          self.resolution, input_factor=factor,
                                          clean_mask=self.clean_mask)
      return
    self.variables = jax.device_put(self.variables)
    self._forward = jax.jit(functools.partial(models.predict_probabilities, self.model))
    self._multiple = size_multiple(self.model)
    self._cascade = cascade_lib.Cascade.of_model(self.model, self.variables, self.resolution,
                                                 clean_mask=self.clean_mask)

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, fit: str = "auto",
                   batch_size: int = 8, clean_mask: bool = True) -> Predictor:
    """The latest (or `step`) checkpoint of a training run, with the model its config names."""
    config, variables, step = checkpoints.restore_model(workdir, step)
    return cls(model=models.create_model(config.model), variables=variables,
               resolution=int(config.data.resolution), step=step, fit=fit,
               batch_size=batch_size, config=config, clean_mask=clean_mask)

  @classmethod
  def from_exported(cls, path: str, *, fit: str = "auto", batch_size: int = 8,
                    expect_model: str | None = None, clean_mask: bool = True) -> Predictor:
    """A `dmjax.export` file (refused if exported from another model than `expect_model`).

    `fit="auto"` and `pad` need a file with symbolic sizes; at a fixed size, `auto` means
    `resize`.
    """
    exported = exported_lib.load(path, expect_model=expect_model)
    fixed_size = exported.fixed_size
    if fit == "pad" and fixed_size is not None:
      raise errors.UserError(f"{path}: exported at a fixed {fixed_size[0]}x{fixed_size[1]}, so "
                             "it runs with fit=resize only")
    if fixed_size is not None and fixed_size[0] != fixed_size[1]:
      raise errors.UserError(f"{path}: exported at a fixed {fixed_size[0]}x{fixed_size[1]}; "
                             "fit=resize needs a square size")
    resolution = (fixed_size[0] if fixed_size is not None
                  else int(exported.metadata["resolution_policy"]["training_resolution"]))
    return cls(model=None, variables=None, resolution=resolution,
               step=exported.metadata["checkpoint_step"] or 0, fit=fit, batch_size=batch_size,
               exported=exported, clean_mask=clean_mask)

  def __call__(self, bg: np.ndarray, fg_bg: np.ndarray) -> Prediction:
    """Mask probability and depth for one pair (H, W[, C]) or a batch (B, H, W, C)."""
    bg, fg_bg = np.asarray(bg), np.asarray(fg_bg)
    single = bg.ndim < 4
    bgs, fg_bgs = (bg[None], fg_bg[None]) if single else (bg, fg_bg)
    if len(bgs) != len(fg_bgs) or (bg.ndim == 4) != (fg_bg.ndim == 4):
      raise errors.UserError(f"bg has shape {bg.shape} but fg_bg {fg_bg.shape}: give one pair or "
                             "two batches of the same length")
    results = self.predict_pairs(list(zip(bgs, fg_bgs, strict=True)))
    mask = np.stack([r.mask for r in results])
    depth = np.stack([r.depth for r in results])
    return Prediction(mask[0], depth[0]) if single else Prediction(mask, depth)

  def predict_pairs(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
    """Predictions for pairs of any (each its own) size, in batches of `batch_size`."""
    inputs = []
    for index, (bg, fg_bg) in enumerate(pairs):
      bg, fg_bg = as_uint8_rgb(bg, f"bg {index}"), as_uint8_rgb(fg_bg, f"fg_bg {index}")
      if bg.shape != fg_bg.shape:
        raise errors.UserError(f"pair {index}: bg is {image_size(bg)} but fg_bg is "
                               f"{image_size(fg_bg)}; a pair must be the same size")
      inputs.append(self._model_input(bg, fg_bg))
    outputs: list[Prediction | None] = [None] * len(inputs)
    # Equal shapes share a batch (and one compiled program); in "resize" mode all are equal.
    by_shape: dict[tuple, list[int]] = {}
    for index, (bg, _) in enumerate(inputs):
      by_shape.setdefault(bg.shape, []).append(index)
    for indices in by_shape.values():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        mask, depth = self._run([inputs[i] for i in chunk])
        for row, index in enumerate(chunk):
          height, width = np.shape(pairs[index][0])[:2]
          outputs[index] = Prediction(*(self._to_input_size(m[row], height, width)
                                        for m in (mask, depth)))
    return outputs

  def working_sizes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
    """The model's input size in each pass of `fit="auto"` for a photo of this size
    (`dmjax.inference.cascade.Cascade.working_sizes`)."""
    return self._cascade.working_sizes(height, width)

  def _model_input(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.fit == "resize":
      bg, fg_bg = (schema.resize_whole_frame(x, self.resolution, self.resolution)
                   for x in (bg, fg_bg))
    elif self.fit == "pad":
      bg, fg_bg = _pad_to_multiple(bg, self._multiple), _pad_to_multiple(fg_bg, self._multiple)
    if self.exported is not None:
      return bg, fg_bg
    return schema.normalize_photo(bg, "bg"), schema.normalize_photo(fg_bg, "fg_bg")

  def _run(self, inputs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if self.fit == "auto":
      # Photos of their own sizes compile per size anyway; padding one large photo to a batch
      # of copies would multiply its time and memory.
      forward, padded = self._cascade, inputs
    else:
      # A short last batch is padded with copies, so every batch has one shape: one compilation.
      forward = functools.partial(self._forward, self.variables)
      padded = inputs + [inputs[-1]] * (self.batch_size - len(inputs))
    bg = np.stack([b for b, _ in padded])
    fg_bg = np.stack([f for _, f in padded])
    mask, depth = jax.device_get(forward(bg, fg_bg))
    return mask[:len(inputs), ..., 0], depth[:len(inputs), ..., 0]

  def _to_input_size(self, values: np.ndarray, height: int, width: int) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if self.fit != "resize":
      return values[:height, :width]
    return _resize_map(values, (width, height))


def _exported_logits(exported: exported_lib.ExportedModel, bg: np.ndarray,
                     fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """An exported file as `Cascade` needs it: photos resized as floats in [0, 255] in, logits out
  (the file takes uint8 photos and gives probabilities)."""
  as_uint8 = lambda x: np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8)
  probabilities = exported(as_uint8(bg), as_uint8(fg_bg))
  clipped = [np.clip(p, 1e-6, 1 - 1e-6) for p in probabilities]
  return tuple(np.log(p) - np.log1p(-p) for p in clipped)


def image_size(image: np.ndarray) -> str:
  return f"{image.shape[1]}×{image.shape[0]}"
