"""`Predictor`: a trained model that predicts mask and depth for photo pairs of any size.

  predictor = Predictor.from_workdir("workdirs/r64")
  mask, depth = predictor(bg, fg_bg)   # float32 in [0, 1], (H, W) or (B, H, W)
  predictor.warm_up()                  # compiles every shape the model can be given

Inputs are numpy arrays, uint8 or [0, 1] floats, (H, W, C) or batches (B, H, W, C). This module
needs no TensorFlow and no TFDS.

The model runs at a few shapes only, whatever the photos' sizes (`model_input_shapes`); photos
are resized, padded and cropped, and outputs resized back, on the host. Pairs share a model call
where their shapes on the device agree, up to `batch_size` pairs and `max_batch_pixels` photo
pixels a call, in batches of `batch_size` or of a power of two below it: a call is never padded
with copies (but in `fit="resize"`, where the copies are of the training size and one batch
shape is worth more than their cost).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from dmjax import checkpoints, errors, models
from dmjax.data import schema
from dmjax.inference import cascade as cascade_lib
from dmjax.inference import compilations
from dmjax.inference import exported as exported_lib
from dmjax.models import layers, refiner

FITS = ("auto", "resize", "pad")
FIT_HELP = ("auto: at the photo's own size, whole photo then object window, the model at a few "
            "working sizes; resize: squeezed to the run's resolution; pad: the whole model at "
            "the photo's size, padded up to the next of a grid of sizes (about 19% apart).")
CLEAN_MASK_HELP = ("With fit=auto: fill the mask's small holes and drop its stray pieces "
                   "(dmjax.inference.mask_cleanup); --noclean_mask: the mask as the model gave it.")
# Photo pixels per model call: one 12-megapixel pair runs alone, eight 2-megapixel ones together.
# It bounds the float32 maps a call holds on the host (about 30 bytes a pixel in fit=auto).
DEFAULT_MAX_BATCH_PIXELS = 16_000_000

compilations.install()  # So that `compilations.count()` sees the first compilation too.


class Prediction(NamedTuple):
  mask: np.ndarray  # Probability of the object, float32 in [0, 1].
  depth: np.ndarray  # Float32 in [0, 1], 0 = nearest.


class WarmUp(NamedTuple):
  shapes: int  # Model input shapes run.
  compiled: int  # Programs XLA compiled for them (the rest came from the persistent cache).
  programs: int  # Programs made, compiled or loaded.
  seconds: float


def as_uint8_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 or [0, 1] float → uint8 (H, W, 3).

  Floats outside [0, 1] are refused, not clipped: a photo read as 0..255 floats (OpenCV's
  `astype(float)`) would otherwise come out white."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise errors.UserError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
                           f"got shape {image.shape}")
  if image.dtype != np.uint8:
    if not np.issubdtype(image.dtype, np.floating):
      raise errors.UserError(f"{what}: expected uint8 or float in [0, 1], got {image.dtype}")
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 1:
      raise errors.UserError(f"{what}: float pixels must lie in [0, 1], got {low:g} to {high:g} "
                             "(for 0..255 values pass uint8, or divide by 255)")
    # The model was trained on 8-bit photos; rounding to them loses nothing it could use.
    image = np.round(image * 255).astype(np.uint8)
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]  # Alpha dropped: a composite's pixels are what the camera saw.


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  resized = schema.resize_whole_frame(values[..., None], size[1], size[0])[..., 0]
  return np.clip(resized, 0.0, 1.0)


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
  height, width = image.shape[:2]
  return cascade_lib.pad_edges(image, cascade_lib.round_up(height, multiple),
                               cascade_lib.round_up(width, multiple))


def size_multiple(model) -> int:
  """What the whole model needs height and width to be multiples of (`fit="pad"`)."""
  return layers.SIZE_MULTIPLE * refiner.input_factor(model)


def pad_side(length: int, multiple: int) -> int:
  """What `fit="pad"` pads a side of `length` to: the first of round(16 · 2^(k/4)), rounded up
  to `multiple`, at least `length` (a grid about 19 % apart, finer where the multiple is the
  larger step): photos of nearby sizes share one compiled program instead of one each."""
  return cascade_lib.round_up(cascade_lib.window_side(length), multiple)


def split_batches(count: int, limit: int) -> list[int]:
  """Batch sizes for `count` pairs, at most `limit` a call: `limit` while that many remain, then
  the largest powers of two (20, 8 → 8 8 4; 7, 8 → 4 2 1). Few batch shapes, each compiled once,
  and no call runs copies."""
  sizes = []
  while count > 0:
    size = limit if count >= limit else 1 << (count.bit_length() - 1)
    sizes.append(size)
    count -= size
  return sizes


def batch_sizes(limit: int) -> list[int]:
  """Every batch size `split_batches` gives under `limit`."""
  return sorted({size for count in range(1, limit + 1) for size in split_batches(count, limit)})


def _normalize_pair(bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return schema.normalize_photo(bg, "bg"), schema.normalize_photo(fg_bg, "fg_bg")


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
    pad     the whole model at the photo's own size, padded (edge pixels repeated) up to the
            next size of a grid (`pad_side`), outputs cropped back.

  `Predictor.from_exported(file)` runs a `dmjax.export` file instead (no model code): all three
  where the file has symbolic sizes; a file exported at a fixed size runs `resize` (`auto` there
  means `resize`).

  `calls` counts model calls by input shape (batch, height, width).
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
  max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS  # Photo pixels per model call (at least 1 pair).

  def __post_init__(self):
    if self.fit not in FITS:
      raise errors.UserError(f"fit={self.fit!r}: expected one of {FITS}")
    if self.batch_size < 1:
      raise errors.UserError(f"batch_size={self.batch_size}: expected at least 1")
    self.calls: collections.Counter[tuple[int, int, int]] = collections.Counter()
    self._cascade: cascade_lib.Cascade | None = None
    if self.exported is not None:
      # The exported function takes uint8 photos and normalises them itself.
      self._forward = self.exported
      self._multiple = self.exported.size_multiple
      if self.exported.fixed_size is not None:  # Its one size is all "auto" could give it.
        self.fit = "resize" if self.fit == "auto" else self.fit
        return
      factor = refiner.REFINE_FACTOR if self.exported.metadata["refiner"] else 1
      self._cascade = cascade_lib.Cascade(
          self._counted(functools.partial(_exported_logits, self.exported)), self.resolution,
          input_factor=factor, clean_mask=self.clean_mask)
      return
    self.variables = jax.device_put(self.variables)
    probabilities = jax.jit(functools.partial(models.predict_probabilities, self.model))
    self._forward = lambda bg, fg_bg: probabilities(self.variables, *_normalize_pair(bg, fg_bg))
    self._multiple = size_multiple(self.model)
    cascade = cascade_lib.Cascade.of_model(self.model, self.variables, self.resolution,
                                           clean_mask=self.clean_mask, prepare=_normalize_pair)
    cascade.forward = self._counted(cascade.forward)
    self._cascade = cascade

  def _counted(self, forward: Callable) -> Callable:
    def counted(bg, fg_bg):
      self.calls[tuple(np.shape(bg)[:3])] += 1
      return forward(bg, fg_bg)
    return counted

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, fit: str = "auto",
                   batch_size: int = 8, clean_mask: bool = True,
                   max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS) -> Predictor:
    """The latest (or `step`) checkpoint of a training run, with the model its config names."""
    config, variables, step = checkpoints.restore_model(workdir, step)
    return cls(model=models.create_model(config.model), variables=variables,
               resolution=int(config.data.resolution), step=step, fit=fit,
               batch_size=batch_size, config=config, clean_mask=clean_mask,
               max_batch_pixels=max_batch_pixels)

  @classmethod
  def from_exported(cls, path: str, *, fit: str = "auto", batch_size: int = 8,
                    expect_model: str | None = None, clean_mask: bool = True,
                    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS) -> Predictor:
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
               exported=exported, clean_mask=clean_mask, max_batch_pixels=max_batch_pixels)

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
    """Predictions for pairs of any (each its own) size, in as few model calls as the limits
    allow (module docstring)."""
    photos = []
    for index, (bg, fg_bg) in enumerate(pairs):
      bg, fg_bg = as_uint8_rgb(bg, f"bg {index}"), as_uint8_rgb(fg_bg, f"fg_bg {index}")
      if bg.shape != fg_bg.shape:
        raise errors.UserError(f"pair {index}: bg is {image_size(bg)} but fg_bg is "
                               f"{image_size(fg_bg)}; a pair must be the same size")
      photos.append((bg, fg_bg))
    outputs: list[Prediction | None] = [None] * len(photos)
    for batch in self._plan_batches([bg.shape[:2] for bg, _ in photos]):
      predictions = self._predict_batch([photos[index] for index in batch])
      for index, prediction in zip(batch, predictions, strict=True):
        outputs[index] = prediction
    return outputs

  def working_sizes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
    """The model's input size in each pass of `fit="auto"` for a photo of this size
    (`dmjax.inference.cascade.Cascade.working_sizes`)."""
    return self._cascade.working_sizes(height, width)

  def model_input_shapes(self,
                         photo_sizes: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
    """Every (batch, height, width) a model call can have: for `fit="auto"` and `resize`
    whatever the photos; for `pad`, for photos of `photo_sizes` (height, width), as its sizes
    have no end."""
    batches = batch_sizes(self.batch_size)
    if self.fit == "resize":
      return [(self.batch_size, self.resolution, self.resolution)]
    if self.fit == "pad":
      return sorted({(batch, *self.pad_shape(*size)) for size in photo_sizes for batch in batches})
    shapes = self._cascade.model_input_shapes()
    # The object pass runs pair by pair.
    return sorted({(batch, *shape) for shape in shapes["frame"] for batch in batches}
                  | {(1, *shape) for shape in shapes["object"]})

  def warm_up(self, photo_sizes: Iterable[tuple[int, int]] = ()) -> WarmUp:
    """Runs the model once at each of `model_input_shapes(photo_sizes)`, so that no later call
    compiles (with the persistent compilation cache, a second start loads them instead)."""
    started, before = time.perf_counter(), compilations.count()
    shapes = self.model_input_shapes(photo_sizes)
    for batch, height, width in shapes:
      if self.fit == "auto":  # The cascade gives the model float32 photos.
        photo = np.zeros((batch, height, width, 3), np.float32)
        jax.device_get(self._cascade.forward(photo, photo))
      else:
        photo = np.zeros((batch, height, width, 3), np.uint8)
        self._run_forward(photo, photo)
    after = compilations.count()
    return WarmUp(len(shapes), after.compiled - before.compiled,
                  after.programs - before.programs, time.perf_counter() - started)

  def pad_shape(self, height: int, width: int) -> tuple[int, int]:
    return pad_side(height, self._multiple), pad_side(width, self._multiple)

  def _batch_key(self, height: int, width: int) -> tuple[int, int]:
    """Pairs of photo sizes with the same key can share a model call."""
    if self.fit == "auto":
      return self._cascade.frame_shape(height, width)
    if self.fit == "pad":
      return self.pad_shape(height, width)
    return (self.resolution, self.resolution)

  def _plan_batches(self, sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of `sizes` (height, width) by model call: same key, at most `batch_size` pairs
    and `max_batch_pixels` pixels (but at least one pair), split as `split_batches` does."""
    by_key: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
      by_key.setdefault(self._batch_key(*size), []).append(index)
    batches = []
    for indices in by_key.values():
      chunk, pixels = [], 0
      for index in indices:
        height, width = sizes[index]
        if chunk and (len(chunk) == self.batch_size
                      or pixels + height * width > self.max_batch_pixels):
          batches += self._split(chunk)
          chunk, pixels = [], 0
        chunk.append(index)
        pixels += height * width
      batches += self._split(chunk)
    return batches

  def _split(self, chunk: list[int]) -> list[list[int]]:
    if self.fit == "resize":  # Padded with copies instead (`_predict_resized`).
      return [chunk]
    batches, start = [], 0
    for size in split_batches(len(chunk), self.batch_size):
      batches.append(chunk[start:start + size])
      start += size
    return batches

  def _predict_batch(self, photos: list[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
    if self.fit == "auto":
      results = self._cascade.predict_batch([bg for bg, _ in photos], [f for _, f in photos])
      return [Prediction(mask, depth) for mask, depth in results]
    if self.fit == "pad":
      shape = self.pad_shape(*photos[0][0].shape[:2])
      bg, fg_bg = (np.stack([cascade_lib.pad_edges(pair[k], *shape) for pair in photos])
                   for k in (0, 1))
      mask, depth = self._run_forward(bg, fg_bg)
      return [Prediction(*(np.array(x[row, :b.shape[0], :b.shape[1]], np.float32)
                           for x in (mask, depth)))
              for row, (b, _) in enumerate(photos)]
    return self._predict_resized(photos)

  def _predict_resized(self, photos: list[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
    # As evaluation resizes (8-bit, PIL's bilinear); a short batch is padded with copies, so
    # that every call has one shape.
    resized = [tuple(schema.resize_whole_frame(x, self.resolution, self.resolution) for x in pair)
               for pair in photos]
    resized += [resized[-1]] * (self.batch_size - len(resized))
    mask, depth = self._run_forward(np.stack([b for b, _ in resized]),
                                    np.stack([f for _, f in resized]))
    return [Prediction(*(_resize_map(np.asarray(x[row], np.float32), (bg.shape[1], bg.shape[0]))
                         for x in (mask, depth)))
            for row, (bg, _) in enumerate(photos)]

  def _run_forward(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (B, H, W) of the whole model on uint8 photos at a working shape."""
    self.calls[bg.shape[:3]] += 1
    mask, depth = jax.device_get(self._forward(bg, fg_bg))
    return np.asarray(mask)[..., 0], np.asarray(depth)[..., 0]


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
