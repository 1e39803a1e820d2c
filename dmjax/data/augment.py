"""Joint augmentation and resizing of one example (numpy and PIL; pure functions of an rng).

One geometric draw (horizontal flip, crop box) applies to all four images so they stay aligned,
which the seed could not do (SPEC §5); photometric jitter applies only to the two photos, drawn
independently for each, so the model sees bg and fg_bg shot under slightly different light.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance

from dmjax import errors
from dmjax.data import schema


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """What `config.data.augment` asks for; plain values so grain workers can unpickle it."""

  flip: bool = True
  min_scale: float = 0.6
  brightness: float = 0.15
  contrast: float = 0.15
  saturation: float = 0.15

  @classmethod
  def from_config(cls, augment_config) -> AugmentSettings | None:
    """The settings, or None when `augment_config.enabled` is False."""
    if not augment_config.enabled:
      return None
    if not 0.0 < augment_config.min_scale <= 1.0:
      raise errors.UserError(f"config.data.augment.min_scale={augment_config.min_scale}: expected "
                             "a value in (0, 1]")
    return cls(flip=bool(augment_config.flip), min_scale=float(augment_config.min_scale),
               brightness=float(augment_config.brightness),
               contrast=float(augment_config.contrast),
               saturation=float(augment_config.saturation))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A crop box (left, top, right, bottom) in source pixels, then an optional mirror."""

  box: tuple[float, float, float, float]
  flip: bool = False


def full_frame(height: int, width: int) -> Geometry:
  return Geometry(box=(0.0, 0.0, float(width), float(height)))


def draw_geometry(rng: np.random.Generator, height: int, width: int,
                  settings: AugmentSettings) -> Geometry:
  """A random crop covering [min_scale, 1] of each side (aspect kept) and a coin-flip mirror."""
  flip = bool(rng.random() < 0.5) and settings.flip
  scale = rng.uniform(settings.min_scale, 1.0)
  crop_height, crop_width = scale * height, scale * width
  top = rng.uniform(0.0, height - crop_height)
  left = rng.uniform(0.0, width - crop_width)
  return Geometry(box=(left, top, left + crop_width, top + crop_height), flip=flip)


def _resize(image: Image.Image, geometry: Geometry, resolution: int) -> Image.Image:
  # PIL's bilinear filter widens with the downscale factor, so shrinking averages the area
  # instead of aliasing; the box crops at sub-pixel precision in the same pass.
  size = (resolution, resolution)
  full = (0.0, 0.0, float(image.width), float(image.height))
  if image.size != size or geometry.box != full:
    image = image.resize(size, Image.Resampling.BILINEAR, box=geometry.box)
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if geometry.flip else image


def transform_example(example: dict[str, np.ndarray], geometry: Geometry,
                      resolution: int) -> dict[str, np.ndarray]:
  """Crops, resizes and flips all four images alike, to (R, R, C).

  The photos stay uint8 (what PIL resizes fastest, and the precision they came in); the mask
  and depth become float32 in [0, 1], the mask resized as soft values (threshold it afterwards)
  and depth in float so the uint16 codes keep their precision.
  """
  out = {key: np.asarray(_resize(Image.fromarray(example[key]), geometry, resolution))
         for key in schema.IMAGE_KEYS}
  mask = example["mask"][..., 0].astype(np.float32) / 255.0
  depth = example["depth"][..., 0].astype(np.float32) / schema.DEPTH_MAX_CODE
  for key, label in (("mask", mask), ("depth", depth)):
    resized = np.asarray(_resize(Image.fromarray(label), geometry, resolution))
    # Bilinear weights are convex, so only float rounding can leave [0, 1].
    out[key] = np.clip(resized, 0.0, 1.0)[..., None]
  return out


def jitter_photometric(image: np.ndarray, rng: np.random.Generator,
                             settings: AugmentSettings) -> np.ndarray:
  """Brightness, contrast and saturation factors in [1 - s, 1 + s], applied in that order to a
  uint8 (H, W, 3) image with PIL's ImageEnhance: what torchvision's ColorJitter does to PIL
  images (a fixed order here, so a record's seed fixes the result)."""
  brightness = 1.0 + rng.uniform(-settings.brightness, settings.brightness)
  contrast = 1.0 + rng.uniform(-settings.contrast, settings.contrast)
  saturation = 1.0 + rng.uniform(-settings.saturation, settings.saturation)
  pil_image = Image.fromarray(image)
  pil_image = ImageEnhance.Brightness(pil_image).enhance(brightness)
  pil_image = ImageEnhance.Contrast(pil_image).enhance(contrast)
  pil_image = ImageEnhance.Color(pil_image).enhance(saturation)
  return np.asarray(pil_image)


def augment_example(example: dict[str, np.ndarray], rng: np.random.Generator | None,
                    settings: AugmentSettings | None, resolution: int) -> dict[str, np.ndarray]:
  """The whole per-example transform to `resolution`: photos uint8, mask and depth float32 in
  [0, 1] (see `transform_example`).

  Without settings (or rng) the full frame is only resized. The draws come from `rng` in a fixed
  order (geometry, bg jitter, fg_bg jitter) so a record's seed fixes its result.
  """
  height, width = example["fg_bg"].shape[:2]
  if settings is None or rng is None:
    return transform_example(example, full_frame(height, width), resolution)
  out = transform_example(example, draw_geometry(rng, height, width, settings), resolution)
  for key in schema.IMAGE_KEYS:
    out[key] = jitter_photometric(out[key], rng, settings)
  return out
