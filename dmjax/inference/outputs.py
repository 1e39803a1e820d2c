"""What a mask is for: the object cut out, or put over another photo.

  rgba = cutout_rgba(fg_bg, mask)                 # uint8 (H, W, 4), alpha = the soft mask
  image = replace_background(fg_bg, mask, beach)  # uint8 (H, W, 3), the object over `beach`

Both at the composite's own size, with the mask probability as alpha (not the thresholded
mask), so edges and hair stay soft. Alpha is straight (not premultiplied), as PNG stores it, and
blending is in the photos' own sRGB values, as rembg and BackgroundMattingV2 blend. Numpy and
Pillow only: `dmjax.predict` and the HTTP API share these.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dmjax import errors


def _check_photo(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise errors.UserError(f"{what}: expected uint8 RGB (H, W, 3), got {image.dtype} "
                           f"{image.shape}")
  return image


def _check_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != size:
    raise errors.UserError(f"mask: expected shape {size} (the composite's), got {mask.shape}")
  if not np.issubdtype(mask.dtype, np.floating):
    raise errors.UserError(f"mask: expected a float probability in [0, 1], got {mask.dtype}")
  mask = mask.astype(np.float32)
  if mask.size and not (np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1):
    raise errors.UserError("mask: expected a float probability in [0, 1], got values outside it")
  return mask


def alpha_channel(mask: np.ndarray) -> np.ndarray:
  """(H, W) mask probability in [0, 1] → uint8 alpha, probability × 255 rounded (as NAME_mask.png
  stores it)."""
  return np.round(_check_mask(mask, np.shape(mask)) * 255).astype(np.uint8)


def cutout_rgba(fg_bg: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The composite (uint8 (H, W, 3)) with the soft mask ((H, W) in [0, 1]) as its alpha:
  uint8 (H, W, 4). Colour is the composite's own, unchanged."""
  fg_bg = _check_photo(fg_bg, "fg_bg")
  _check_mask(mask, fg_bg.shape[:2])
  return np.concatenate([fg_bg, alpha_channel(mask)[..., None]], axis=-1)


def fit_cover(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (h, w, 3) → (height, width, 3): scaled to cover the whole frame keeping its aspect
  ratio, the excess cut off equally from both sides (CSS `object-fit: cover`). Nothing is
  stretched and no bars are added; a new background of another shape loses its edges."""
  image = _check_photo(image, "new background")
  source_height, source_width = image.shape[:2]
  if (source_height, source_width) == (height, width):
    return image
  scale = max(height / source_height, width / source_width)
  crop_height, crop_width = height / scale, width / scale  # In source pixels; one may be whole.
  top, left = (source_height - crop_height) / 2, (source_width - crop_width) / 2
  # Bilinear widens with the downscale factor (averages, no aliasing), as everywhere here.
  resized = Image.fromarray(image).resize(
      (width, height), Image.Resampling.BILINEAR,
      box=(left, top, left + crop_width, top + crop_height))
  return np.asarray(resized)


def replace_background(fg_bg: np.ndarray, mask: np.ndarray, new_bg: np.ndarray) -> np.ndarray:
  """The object of the composite over `new_bg`: mask · fg_bg + (1 − mask) · new_bg per pixel,
  rounded, uint8 (H, W, 3) at the composite's size; `new_bg` (uint8 RGB, any size) is fitted
  with `fit_cover`."""
  fg_bg = _check_photo(fg_bg, "fg_bg")
  alpha = _check_mask(mask, fg_bg.shape[:2])[..., None]
  background = fit_cover(new_bg, *fg_bg.shape[:2]).astype(np.float32)
  blended = alpha * fg_bg.astype(np.float32) + (1 - alpha) * background
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)
