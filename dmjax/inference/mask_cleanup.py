"""One object's mask without stray specks and pinholes: `clean_mask`.

A composite holds one object (the seed datasets' and the renderer's), yet a thresholded mask can
show it in pieces: specks where the photos differ for other reasons (shadows, a slight shift of
the camera), holes where the object looks like the wall behind it. Each adds a boundary that is
no edge of the object. Filling holes up to `MAX_HOLE` of the object's area and dropping pieces
under `MIN_PART` of the largest one was chosen on 160 unseen scenes
(`render_example("train", i, seed=1)`, neither training nor test scenes) with the 2,600-step
default run: boundary F 0.907 -> 0.913 at 512 px (filling alone 0.911, dropping alone 0.910;
dropping under 5 % or 20 % of the largest piece 0.912), 0.923 -> 0.922 at 192 px; mask IoU
+0.001 to +0.002. On three other sets of 160 scenes at 192 px boundary F rose by 0.003 to 0.005.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dmjax.data.schema import MASK_THRESHOLD

MAX_HOLE = 0.1  # Holes up to this fraction of the object's area are filled.
MIN_PART = 0.1  # Pieces under this fraction of the largest piece are dropped.
# Pieces of the object are 8-connected, so holes (and the outside) are 4-connected: a hole does
# not leak out through a diagonal gap that the object closes.
_PIECES = np.ones((3, 3), bool)


def clean_mask(probability: np.ndarray, *, max_hole: float = MAX_HOLE,
               min_part: float = MIN_PART) -> np.ndarray:
  """(H, W) mask probability with holes filled and small pieces dropped, as described above.

  Only pixels that change sides of `MASK_THRESHOLD` (the metrics' threshold) change, each to its
  mirror image about it (0.3 in a filled hole becomes 0.7), so the soft mask keeps its
  confidence and agrees with the cleaned thresholded one. A hole is a part of the background that
  does not reach the photo's edge.
  """
  probability = np.asarray(probability, np.float32)
  mask = probability > MASK_THRESHOLD
  area = int(mask.sum())
  if not area:
    return probability
  cleaned = mask | _small_holes(mask, max_hole * area)
  pieces, count = ndimage.label(cleaned, structure=_PIECES)
  if count > 1:
    sizes = np.bincount(pieces.ravel())[1:]
    keep = np.concatenate([[False], sizes >= min_part * sizes.max()])
    cleaned = keep[pieces]
  flipped = 1.0 - probability
  # A pixel exactly at the threshold mirrors onto it; the next float above makes it object.
  added = np.maximum(flipped, np.nextafter(np.float32(MASK_THRESHOLD), np.float32(1)))
  return np.where(cleaned & ~mask, added, np.where(mask & ~cleaned, flipped, probability))


def _small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
  background, count = ndimage.label(~mask)
  if not count:
    return np.zeros_like(mask)
  sizes = np.bincount(background.ravel())
  reaches_edge = np.unique(np.concatenate([background[0], background[-1], background[:, 0],
                                           background[:, -1]]))
  is_hole = sizes <= max_area
  is_hole[0] = False  # Label 0 is the object itself.
  is_hole[reaches_edge] = False
  return is_hole[background]
