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
memory hardly grow with the photo. Those resizes, the pasting and the sigmoid run on the host
(Pillow and numpy, in float32): the device only ever sees the working sizes, a short list
(`Cascade.model_input_shapes`), so a photo of a size not seen before compiles nothing new. On
the host, Pillow's bilinear filter (widened when shrinking) gives what `refiner.resize` gave on
the device to within 3e-6 of the photo's range (measured on random photos, 37 × 50 to
1000 × 700, shrunk and enlarged).

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
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image
from scipy import special

from dmjax.inference import mask_cleanup
from dmjax.models import layers, refiner

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


def round_up(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def pad_edges(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, C) → (height, width, C), padded at the bottom and right by repeating the edge pixels
  (adds no edges the model could take for an object)."""
  if image.shape[:2] == (height, width):
    return image
  return np.pad(image, ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0)),
                mode="edge")


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w) → float32 (height, width), on the host with PIL's bilinear filter, which widens with
  the shrink factor (antialiased, as `refiner.resize`): a writable copy."""
  plane = np.asarray(plane, np.float32)
  if plane.shape == (height, width):
    return plane.copy()
  image = Image.fromarray(np.ascontiguousarray(plane))  # Mode "F": 32-bit float.
  return np.array(image.resize((width, height), Image.Resampling.BILINEAR))


def resize_channels(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, C) of any dtype → float32 (height, width, C), channel by channel (`resize_plane`):
  no rounding to 8 bits, and only one full-size float channel at a time."""
  return np.stack([resize_plane(image[..., c], height, width) for c in range(image.shape[-1])],
                  axis=-1)


class Cascade:
  """A trained model applied to photos of any size, in the two passes above.

  `forward(bg, fg_bg)` gives mask and depth logits (B, h, w, 1) for NHWC photo batches whose
  height and width are multiples of its `multiple`; `resolution` is the size it was trained at,
  and `input_factor` its input size over its base network's working size (2 for a refined
  model). Photos go in as they come (uint8 0..255 from `Predictor`, which gives a `forward` that
  normalises them) and are resized on the host, as float32 and channel by channel, to each
  pass's working size, padded with their edge pixels to the next multiple of `multiple`, and
  given to `forward`; its logits come back to the host, are resized there to the photo's (or
  window's) size, and become probabilities there.

  So the model only ever sees the few sizes `model_input_shapes` lists, whatever the photos'
  sizes: the whole photo at its long side's one working size (the short side padded to a
  multiple), the object window at one size or, for a small window, one of a few. Nothing runs
  on the device at a photo's own size, so a photo of a new size compiles nothing once those are
  compiled (`Predictor.warm_up`).
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

  @classmethod
  def of_model(cls, model: nn.Module, variables, resolution: int, *, clean_mask: bool = True,
               prepare: Callable[[np.ndarray, np.ndarray], tuple] | None = None) -> Cascade:
    """For a model and its variables, on what `prepare(bg, fg_bg)` makes of the resized photos
    (default: the photos as they are, e.g. already normalised)."""
    logits = jax.jit(lambda v, bg, fg_bg: _float32_logits(model.apply(v, bg, fg_bg,
                                                                      train=False)))
    forward = functools.partial(logits, variables)
    if prepare is not None:
      forward = lambda bg, fg_bg, plain=forward: plain(*prepare(bg, fg_bg))  # noqa: E731
    return cls(forward, resolution, input_factor=refiner.input_factor(model),
               clean_mask=clean_mask)

  def input_size(self, height: int, width: int, base_long_side: int) -> tuple[int, int]:
    """What the model is given for an image of this size whose base works at `base_long_side`."""
    scale = self.input_factor * base_long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))

  def padded(self, size: tuple[int, int]) -> tuple[int, int]:
    return round_up(size[0], self.multiple), round_up(size[1], self.multiple)

  def frame_shape(self, height: int, width: int) -> tuple[int, int]:
    """The model's input shape in the whole-photo pass for a photo of this size: photos with
    the same one share a batch."""
    return self.padded(self.input_size(height, width, self.frame_base))

  def object_base_side(self, window_side: int) -> int:
    return min(self.object_base, window_side)

  def working_sizes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
    """The model's input size in each pass for a photo of this size; the object pass's for any
    window but one smaller than that."""
    return {"frame": self.input_size(height, width, self.frame_base),
            "object": self.input_size(self.object_base, self.object_base, self.object_base)}

  def model_input_shapes(self) -> dict[str, list[tuple[int, int]]]:
    """Every (height, width) the model can be given, by pass, whatever the photo: the whole
    photo's long side is always `input_factor · frame_base` (padded up to a multiple), its
    short side any multiple up to that; an object window's side is `object_base`, or one of
    the `window_side` grid's below it (its own, where smaller)."""
    long_side = round_up(self.input_factor * self.frame_base, self.multiple)
    frame = {(short, long_side) for short in range(self.multiple, long_side + 1, self.multiple)}
    frame |= {(w, h) for h, w in frame}
    bases = [side for side in window_sides(self.object_base) if side < self.object_base]
    objects = {round_up(self.input_factor * base, self.multiple)
               for base in (*bases, self.object_base)}
    return {"frame": sorted(frame), "object": sorted((side, side) for side in objects)}

  def predict_batch(self, bgs: Sequence[np.ndarray],
                    fg_bgs: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask probability, depth) in [0, 1], (H, W) float32 at each photo's size, for pairs of
    (H, W, 3) photos of sizes that share one `frame_shape` (one model call for the whole-photo
    pass; the object pass runs pair by pair)."""
    results = []
    frame_logits = self._pass_each(bgs, fg_bgs, self.frame_base)
    for bg, fg_bg, (mask, depth) in zip(bgs, fg_bgs, frame_logits, strict=True):
      self._object_pass(bg, fg_bg, mask)
      mask = special.expit(mask, out=mask)
      if self.clean_mask:
        mask = mask_cleanup.clean_mask(mask)
      results.append((mask, special.expit(depth, out=depth)))
    return results

  def _object_pass(self, bg: np.ndarray, fg_bg: np.ndarray, mask: np.ndarray) -> None:
    """Pastes the object window's mask logits into `mask` (the whole-photo pass's, (H, W)),
    where the window shows the object finer than that pass did."""
    window = object_window(mask)
    if window is None:
      return
    base_side = self.object_base_side(window.side)
    if base_side / window.side <= self.frame_base / max(bg.shape[:2]):
      return  # No finer than pass 1 saw it.
    crops = [crop_window(x[None], window)[0] for x in (bg, fg_bg)]
    ((window_mask, _),) = self._pass_each(crops[:1], crops[1:], base_side)
    paste_window(mask, window_mask, window)

  def _pass_each(self, bgs: Sequence[np.ndarray], fg_bgs: Sequence[np.ndarray],
                 base_long_side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mask and depth logits, (H, W) float32 at each photo's size, from one model call at the
    working size (which the photos' sizes must share once padded)."""
    sizes = [self.input_size(*bg.shape[:2], base_long_side) for bg in bgs]
    shapes = {self.padded(size) for size in sizes}
    if len(shapes) != 1:
      raise ValueError(f"photos of working sizes {sorted(shapes)} cannot share a model call")
    (height, width), = shapes
    inputs = [np.stack([pad_edges(resize_channels(x, *size), height, width)
                        for x, size in zip(images, sizes, strict=True)])
              for images in (bgs, fg_bgs)]
    mask, depth = (np.asarray(x, np.float32)[..., 0]
                   for x in jax.device_get(self.forward(*inputs)))
    return [tuple(resize_plane(x[index, :size[0], :size[1]], *bg.shape[:2]) for x in (mask, depth))
            for index, (bg, size) in enumerate(zip(bgs, sizes, strict=True))]

  def _pass(self, bg: np.ndarray, fg_bg: np.ndarray,
            base_long_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask and depth logits (B, H, W, 1) for NHWC batches of one size."""
    logits = self._pass_each(list(np.asarray(bg)), list(np.asarray(fg_bg)), base_long_side)
    return tuple(np.stack([pair[k] for pair in logits])[..., None] for k in (0, 1))

  def __call__(self, bg, fg_bg) -> tuple[np.ndarray, np.ndarray]:
    """Mask probability and depth (B, H, W, 1) for NHWC batches of one size."""
    results = self.predict_batch(list(np.asarray(bg)), list(np.asarray(fg_bg)))
    return tuple(np.stack([pair[k] for pair in results])[..., None] for k in (0, 1))


def window_sides(up_to: int) -> list[int]:
  """Every `window_side` up to the first at least `up_to`."""
  sides, k = [], 0
  while not sides or sides[-1] < up_to:
    sides.append(round(16 * 2 ** (k / 4)))
    k += 1
  return sides


def _float32_logits(outputs: dict[str, Array]) -> tuple[Array, Array]:
  return outputs["mask"].astype(jnp.float32), outputs["depth"].astype(jnp.float32)
