"""How a trained model meets a photo of any size: `Predictor`'s `fit="auto"`.

Two passes, each at a working size where objects look as they did in training:

1. the whole photo, its long side at `FRAME_ZOOM` times the base network's training size: where
   the object is, and the depth map;
2. a square window around the object, `OBJECT_CONTEXT` times the long side of its bounding box
   (edge pixels repeated where it leaves the photo), at `OBJECT_ZOOM` times the training size
   but never enlarged: the mask, pasted back where the window lies. It runs only where it sees
   the object at a finer scale than pass 1 did (not for photos of about the training size).

Then `mask_cleanup.clean_mask` fills the mask's small holes and drops its stray pieces.

Each pass is the trained model's own forward pass, on the photos resized so that its base
network works at the pass's size (a refined model, dmjax.models.refiner, takes twice that: its
base at half, then one refiner step), the logits resized to the photo's (or window's) size.
So a small object in a large photo is segmented at the scale the network knows, and cost and
memory hardly grow with the photo.

Chosen on unseen scenes (`render_example("train", i, seed=1)`: neither training nor test
scenes) with the 2,600-step default run. Mask IoU / boundary F at 512 px, 32 scenes: the
cascade of before (base at up to 3.5x its training size, then the refiner at every 2x step to
the photo's size) 0.886 / 0.796; the same with one refiner step 0.888 / 0.875; these two passes
0.905 / 0.888. A window of 2 box sides beat 2.5 and 3 at 192 and 512 px, and not cutting it to
the photo beat cutting it (+0.009 IoU at 512 px). On 64 px photos an object pass that enlarges
its window lost to pass 1 alone (0.826 against 0.848 IoU), hence the rule that skips it.
Pass 1 ran at the training size until later figures (the 2,600-step run with
`loss.depth_log_l1`) showed 1.25 times it better: on 64 unseen scenes, depth δ1 0.753 -> 0.790
at 192 px and 0.758 -> 0.788 at 512 px (after alignment 0.930 -> 0.934 and 0.931 -> 0.934),
masks within ±0.007; on the 40 of the first 400 unseen scenes whose object covers under 1.25 %
of the frame, which pass 1 at the training size missed or cut short, IoU / boundary F
0.696 / 0.860 -> 0.744 / 0.928 at 192 px and 0.780 / 0.864 -> 0.825 / 0.920 at 512 px. A
separate search for the object at 1.5 times did no better than this one pass. Test split
figures: README, "Photos of any size".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dmjax.inference import mask_cleanup
from dmjax.models import layers, refiner
from dmjax.models.refiner import resize

Array = jax.Array

# Pass 1's base size, in base training sizes. Training crops cover 0.6 to 1 of each side of a
# scene (`augment.min_scale`) at the training size, so the network saw whole scenes at 1 to 1.67
# times it, 1.28 on average.
FRAME_ZOOM = 1.25
OBJECT_ZOOM = 1.5  # Pass 2's base size, in base training sizes (at most the window's own).
OBJECT_CONTEXT = 2.0  # The object window's side, in long sides of the object's bounding box.


@dataclasses.dataclass(frozen=True)
class Window:
  """A square of the photo: rows top..top+side, columns left..left+side. Parts outside the
  photo (where the square is larger than a side of it) are filled with the photo's edge."""

  top: int
  left: int
  side: int


def object_window(mask_logits: np.ndarray, context: float = OBJECT_CONTEXT) -> Window | None:
  """The square around the bounding box of every pixel of (H, W) `mask_logits` above 0 (mask
  probability 0.5), `context` times the box's long side (up to the next `window_side`), moved
  inside the photo where it fits; None if no pixel is above 0.

  It is not cut to the photo: a large object keeps its margin, so the window's base sees it at
  the same scale as a small one."""
  rows, cols = np.nonzero(mask_logits > 0)
  if not rows.size:
    return None
  height, width = mask_logits.shape
  box = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
  side = window_side(context * box)
  return Window(_span_start((rows.min() + rows.max() + 1) / 2, side, height),
                _span_start((cols.min() + cols.max() + 1) / 2, side, width), side)


def window_side(length: float) -> int:
  """The smallest side of the grid round(16 · 2^(k/4)) that is at least `length`: windows come
  in a few sizes, each compiled once, where exact sides would compile their resizes for nearly
  every photo (and every frame of a video)."""
  k = max(0, math.floor(4 * math.log2(max(length, 1) / 16)))
  while round(16 * 2 ** (k / 4)) < length:
    k += 1
  return round(16 * 2 ** (k / 4))


def _span_start(centre: float, side: int, length: int) -> int:
  if side >= length:  # Larger than the photo along this axis: the photo in its middle.
    return (length - side) // 2
  return int(np.clip(round(centre - side / 2), 0, length - side))


def crop_window(images: np.ndarray, window: Window) -> np.ndarray:
  """The window of NHWC `images`, with edge pixels repeated where it leaves the photo (bg and
  fg_bg get the same padding, so it adds no difference the model could take for an object)."""
  height, width = images.shape[1:3]
  top, left, side = window.top, window.left, window.side
  pads = (max(0, -top), max(0, top + side - height), max(0, -left), max(0, left + side - width))
  if any(pads):
    images = np.pad(images, ((0, 0), pads[:2], pads[2:], (0, 0)), mode="edge")
    top, left = top + pads[0], left + pads[2]
  return images[:, top:top + side, left:left + side]


def paste_window(canvas: np.ndarray, values: np.ndarray, window: Window) -> None:
  """Writes (side, side, C) `values` into (H, W, C) `canvas` where the window covers it."""
  height, width = canvas.shape[:2]
  rows = slice(max(window.top, 0), min(window.top + window.side, height))
  cols = slice(max(window.left, 0), min(window.left + window.side, width))
  canvas[rows, cols] = values[rows.start - window.top:rows.stop - window.top,
                              cols.start - window.left:cols.stop - window.left]


def pad_to_multiple(images: Array, multiple: int) -> Array:
  """Pads NHWC images at the bottom and right by repeating the edge pixels (adds no edges)."""
  pad_height, pad_width = -images.shape[1] % multiple, -images.shape[2] % multiple
  if not pad_height and not pad_width:
    return images
  return jnp.pad(images, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)), mode="edge")


class Cascade:
  """A trained model applied to photos of any size, in the two passes above.

  `forward(bg, fg_bg)` gives mask and depth logits for NHWC photo batches whose height and width
  are multiples of its `multiple`; `resolution` is the size it was trained at, and
  `input_factor` its input size over its base network's working size (2 for a refined model).
  Called on float32 NHWC photos of one size (what `forward` takes, at any size), a `Cascade`
  returns the mask probability and depth in [0, 1] at that size. The object pass gives
  `forward` one size for every window but small ones, so it compiles once for it whatever the
  photos (the resizes, cheap to compile, once per window size). `clean_mask=False` returns the
  mask as the passes left it.
  """

  def __init__(self, forward: Callable[[Array, Array], tuple[Array, Array]], resolution: int,
               *, input_factor: int = 1, clean_mask: bool = True):
    self.forward = forward
    self.clean_mask = clean_mask
    self.base_resolution = resolution // input_factor
    # The base's working size in each pass (the object pass's for windows at least as large).
    self.frame_base = round(FRAME_ZOOM * self.base_resolution)
    self.object_base = round(OBJECT_ZOOM * self.base_resolution)
    self.input_factor = input_factor
    self.multiple = layers.SIZE_MULTIPLE * input_factor
    self._resize = jax.jit(resize, static_argnums=(1, 2))

  @classmethod
  def of_model(cls, model: nn.Module, variables, resolution: int, *,
               clean_mask: bool = True) -> Cascade:
    """For a model and its variables, on normalised photos (`schema.normalize_photo`)."""
    logits = jax.jit(lambda v, bg, fg_bg: _float32_logits(model.apply(v, bg, fg_bg,
                                                                      train=False)))
    return cls(functools.partial(logits, variables), resolution,
               input_factor=refiner.input_factor(model), clean_mask=clean_mask)

  def input_size(self, height: int, width: int, base_long_side: int) -> tuple[int, int]:
    """What the model is given for an image of this size whose base works at `base_long_side`."""
    scale = self.input_factor * base_long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))

  def object_base_side(self, window_side: int) -> int:
    return min(self.object_base, window_side)

  def working_sizes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
    """The model's input size in each pass for a photo of this size; the object pass's for any
    window but one smaller than that."""
    return {"frame": self.input_size(height, width, self.frame_base),
            "object": self.input_size(self.object_base, self.object_base, self.object_base)}

  def logits(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frame_scale = self.frame_base / max(bg.shape[1:3])
    mask, depth = (np.array(x) for x in self._pass(jnp.asarray(bg), jnp.asarray(fg_bg),
                                                   self.frame_base))
    for index in range(len(bg)):
      window = object_window(mask[index, ..., 0])
      if window is None:
        continue
      base_side = self.object_base_side(window.side)
      if base_side / window.side <= frame_scale:
        continue  # No finer than pass 1 saw it.
      crops = [jnp.asarray(crop_window(x[index:index + 1], window)) for x in (bg, fg_bg)]
      window_mask, _ = self._pass(*crops, base_side)
      paste_window(mask[index], np.asarray(window_mask[0]), window)
    return mask, depth

  def _pass(self, bg: Array, fg_bg: Array, base_long_side: int) -> tuple[Array, Array]:
    """Mask and depth logits at the photos' size, from the model at its working size."""
    height, width = bg.shape[1:3]
    size = self.input_size(height, width, base_long_side)
    inputs = [pad_to_multiple(self._resize(x, *size), self.multiple) for x in (bg, fg_bg)]
    return tuple(self._resize(x[:, :size[0], :size[1]], height, width)
                 for x in self.forward(*inputs))

  def __call__(self, bg, fg_bg) -> tuple[np.ndarray, np.ndarray]:
    mask, depth = self.logits(np.asarray(bg, np.float32), np.asarray(fg_bg, np.float32))
    mask = np.asarray(jax.nn.sigmoid(mask))
    if self.clean_mask:
      mask = np.stack([mask_cleanup.clean_mask(m[..., 0])[..., None] for m in mask])
    return mask, np.asarray(jax.nn.sigmoid(depth))


def _float32_logits(outputs: dict[str, Array]) -> tuple[Array, Array]:
  return outputs["mask"].astype(jnp.float32), outputs["depth"].astype(jnp.float32)
