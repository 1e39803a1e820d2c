"""Pictures of predictions: a depth colour map, grids of examples, titles."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Anchors of a perceptually ordered dark-blue → green → yellow map (viridis-like), interpolated
# linearly; near (0) is dark, far (1) is bright.
_ANCHORS = np.array([
    [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530],
    [0.207, 0.372, 0.553], [0.164, 0.471, 0.558], [0.128, 0.567, 0.551],
    [0.135, 0.659, 0.518], [0.267, 0.749, 0.441], [0.478, 0.821, 0.318],
    [0.741, 0.873, 0.150], [0.993, 0.906, 0.144],
])


def colorize(values: np.ndarray) -> np.ndarray:
  """Maps values in [0, 1] of shape (..., 1) or (...) to uint8 RGB of shape (..., 3)."""
  values = np.asarray(values, np.float32)
  if values.ndim and values.shape[-1] == 1:
    values = values[..., 0]
  position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
  low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
  frac = (position - low)[..., None]
  rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
  return np.round(rgb * 255).astype(np.uint8)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
  """[0, 1] images with 1 or 3 channels to uint8 RGB."""
  image = np.clip(np.asarray(image, np.float32), 0, 1)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.round(image * 255).astype(np.uint8)


def tile_grid(rows: list[list[np.ndarray]], *, gap: int = 2) -> np.ndarray:
  """Images (uint8 (H, W, 3), all the same size) laid out in rows, `gap` white pixels apart."""
  height, width, _ = rows[0][0].shape
  columns = max(len(row) for row in rows)
  grid = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255,
                 np.uint8)
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      top, left = r * (height + gap), c * (width + gap)
      grid[top:top + height, left:left + width] = image
  return grid


def example_grid(bg, fg_bg, mask, mask_pred, depth, depth_pred, *, gap: int = 2) -> np.ndarray:
  """One row per example: bg, fg_bg, true mask, predicted mask, true depth, predicted depth.

  All inputs are [0, 1] arrays of shape (B, H, W, C). Returns uint8 (rows, cols, 3).
  """
  columns = [to_uint8_rgb(bg), to_uint8_rgb(fg_bg), to_uint8_rgb(mask), to_uint8_rgb(mask_pred),
             colorize(depth), colorize(depth_pred)]
  return tile_grid([[images[row] for images in columns] for row in range(len(columns[0]))],
                   gap=gap)


def title_strip(text: str, width: int, height: int = 16) -> np.ndarray:
  """A white strip with `text` in black, uint8 (height, width, 3): a title over a grid."""
  strip = Image.new("RGB", (width, height), (255, 255, 255))
  ImageDraw.Draw(strip).text((4, 2), text, fill=(0, 0, 0))
  return np.asarray(strip)
