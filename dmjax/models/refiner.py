"""Sharp outputs at any photo size: a base network at a fraction of the resolution, then a small
refiner that sharpens its logits one 2x step at a time, using the full-resolution photos.

This is BackgroundMattingV2's split (a base network at low resolution, a light refiner at full
resolution) applied as a cascade. In training, `Refined` runs its base at half the input size and
one refiner step back to it. At inference, `cascade_sizes` picks a base size where the base sees
objects at about the scale it was trained on, and `Cascade` applies the same refiner at every 2x
step up to the photo's own size (depth comes from the base alone, at a working size of its
own: `DEPTH_BASE_ZOOM`). The refiner only corrects what the upsampled logits leave
uncertain (its last conv starts at zero, so an untrained refiner returns the upsampled logits)
and needs a few pixels of context: after a 2x step the uncertain band is a pixel or two wide.
It is trained for one step, and each further step gains less (README, "Photos of any size").

The refiner has no normalisation across pixels at inference (BatchNorm uses its running
statistics), so it can run on overlapping bands of rows (`refine_in_bands`) with exactly the
result of one call over the whole image, in a fraction of the memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dmjax.models import layers

Array = jax.Array

REFINE_FACTOR = 2  # The base runs at 1/2 of the training input size.
# The farthest pixel one refined output depends on, per side: three 3x3 convs and one with
# dilation 2 (1 + 1 + 2 + 1). Bands overlap by more than this.
RECEPTIVE_RADIUS = 5
BAND_HALO = RECEPTIVE_RADIUS + 3
# How large the base's working size may be, relative to its training size. It saw crops of 60 %
# to 100 % of scenes (and close-ups), so objects up to about twice as large as in a whole scene
# at its size are familiar. Chosen on training-split scenes at 512 px (16 of them, never the
# test split): 3.5 (base at 128 for a 512 photo) gave mask IoU 0.885 and boundary F 0.878, 1.75
# (base at 64) 0.855 and 0.790, 7 (base at 256) 0.708 and 0.813.
MAX_BASE_ZOOM = 3.5
# Depth is taken from the base at a working size of its own, upsampled: the refiner's depth
# correction changed δ1 by under 0.001 (192 px, training split), and the base's depth is
# scale-dependent. On the same 16 training-split scenes at 512 px, δ1 after alignment was 0.890
# with the base at 64 (1.75) and 0.754 at 128 (3.5).
DEPTH_BASE_ZOOM = 1.75


def resize(images: Array, height: int, width: int) -> Array:
  """Bilinear resize of NHWC images, antialiased when shrinking (PIL's BILINEAR does the same)."""
  if images.shape[1:3] == (height, width):
    return images
  return jax.image.resize(images, (images.shape[0], height, width, images.shape[3]), "linear",
                          antialias=True)


class Refiner(nn.Module):
  """One refinement step: the photos and upsampled logits at one size in, better logits out."""

  features: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, mask_logits: Array, depth_logits: Array,
               train: bool = False) -> tuple[Array, Array]:
    # The difference of the two photos is the strongest cue at full resolution; its absolute
    # value is given, as a ReLU network would otherwise spend channels on both signs.
    x = jnp.concatenate([bg, fg_bg, jnp.abs(fg_bg - bg), mask_logits, depth_logits], axis=-1)
    x = x.astype(self.dtype)
    f = self.features
    x = layers.ConvBNReLU(f, dtype=self.dtype, name="conv1")(x, train)
    x = layers.ConvBNReLU(f, dtype=self.dtype, name="conv2")(x, train)
    x = layers.ConvBNReLU(f, dilation=2, dtype=self.dtype, name="conv3")(x, train)
    delta = nn.Conv(2, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.zeros, name="delta")(x)
    delta = delta.astype(jnp.float32)
    return mask_logits + delta[..., :1], depth_logits + delta[..., 1:]


class Refined(nn.Module):
  """Any registered model (`base`) at half the input size, then one `Refiner` step.

  Returns the refined `mask` and `depth` logits at the input size, and the base's own logits
  under `coarse` (trained too, against labels at its size: `loss.coarse`).
  """

  base: nn.Module
  features: int = 16
  # In training, the refiner sees only this square window of each example (0: all of it), the
  # one where the base is least sure of the mask: BackgroundMattingV2 refines only such patches.
  # The outputs then carry `window`, each example's (top, left), for the loss to crop labels.
  train_window: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.refiner = Refiner(self.features, self.dtype)

  def __call__(self, bg: Array, fg_bg: Array, train: bool = False) -> dict[str, Any]:
    layers.check_inputs(bg, fg_bg, multiple=layers.SIZE_MULTIPLE * REFINE_FACTOR)
    height, width = bg.shape[1:3]
    small = [resize(x, height // REFINE_FACTOR, width // REFINE_FACTOR) for x in (bg, fg_bg)]
    coarse = self.base(*small, train=train)
    inputs = (bg, fg_bg, *upsample_logits(coarse, height, width))
    outputs = {"coarse": coarse}
    if train and 0 < self.train_window < min(height, width):
      outputs["window"] = least_certain_window(inputs[2], self.train_window)
      inputs = [crop_windows(x, outputs["window"], self.train_window) for x in inputs]
    outputs["mask"], outputs["depth"] = self.refiner(*inputs, train=train)
    return outputs

  def coarse(self, bg: Array, fg_bg: Array) -> dict[str, Array]:
    return self.base(bg, fg_bg, train=False)

  def refine(self, bg: Array, fg_bg: Array, mask_logits: Array,
             depth_logits: Array) -> tuple[Array, Array]:
    return self.refiner(bg, fg_bg, mask_logits, depth_logits, train=False)


def least_certain_window(mask_logits: Array, size: int, stride: int = 8) -> Array:
  """(B, 2) int32 (top, left) of the `size` square with the most mask uncertainty p·(1 - p)."""
  probs = jax.nn.sigmoid(jax.lax.stop_gradient(mask_logits[..., 0]))
  sums = jax.lax.reduce_window(probs * (1 - probs), 0.0, jax.lax.add, (1, size, size),
                               (1, stride, stride), "VALID")
  rows, cols = jnp.unravel_index(jnp.argmax(sums.reshape(len(sums), -1), axis=1), sums.shape[1:])
  return jnp.stack([rows, cols], axis=-1).astype(jnp.int32) * stride


def crop_windows(images: Array, corners: Array, size: int) -> Array:
  """The `size` square of each NHWC image at its (top, left) corner."""
  crop = lambda image, corner: jax.lax.dynamic_slice(
      image, (corner[0], corner[1], 0), (size, size, image.shape[-1]))
  return jax.vmap(crop)(images, corners)


def upsample_logits(outputs: dict[str, Array], height: int, width: int) -> tuple[Array, Array]:
  return (resize(outputs["mask"].astype(jnp.float32), height, width),
          resize(outputs["depth"].astype(jnp.float32), height, width))


# ---- Inference at any size.


def cascade_sizes(height: int, width: int, base_resolution: int, refined: bool,
                  max_zoom: float = MAX_BASE_ZOOM) -> list[tuple[int, int]]:
  """The (height, width) of each level, from the base's to the photo's own.

  The base gets the photo halved until its long side is at most `max_zoom` times the base's
  training size; each further level doubles it, the last being the photo's size. Without a
  refiner there is one level, the base's (its output is then resized to the photo).
  """
  long_side = max(height, width)
  halvings = 0
  while long_side / 2**halvings > max_zoom * base_resolution:
    halvings += 1
  if not refined:
    return [_scaled(height, width, halvings)]
  halvings = max(halvings, 1)
  return [_scaled(height, width, k) for k in range(halvings, -1, -1)]


def _scaled(height: int, width: int, halvings: int) -> tuple[int, int]:
  return max(1, round(height / 2**halvings)), max(1, round(width / 2**halvings))


def padded_size(height: int, width: int, multiple: int = layers.SIZE_MULTIPLE) -> tuple[int, int]:
  return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to(images: Array, height: int, width: int) -> Array:
  """Pads NHWC images at the bottom and right by repeating the edge pixels (adds no edges)."""
  pad_height, pad_width = height - images.shape[1], width - images.shape[2]
  if not pad_height and not pad_width:
    return images
  return jnp.pad(images, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)), mode="edge")


def refine_in_bands(refine: Callable[..., tuple[Array, Array]], bg: Array, fg_bg: Array,
                    mask_logits: Array, depth_logits: Array,
                    band_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """`refine` over overlapping bands of `band_rows` rows: the same result as one call over the
  whole image, with memory for one band only.

  Every band's window is `band_rows + 2·BAND_HALO` rows, moved inside the image at its top and
  bottom, so all calls have one shape (one compilation); rows nearer than the halo to a window
  edge that is not the image's own edge are not used.
  """
  height = bg.shape[1]
  window = band_rows + 2 * BAND_HALO
  if height <= window:
    return tuple(np.asarray(x) for x in refine(bg, fg_bg, mask_logits, depth_logits))
  mask = np.empty(mask_logits.shape, np.float32)
  depth = np.empty(depth_logits.shape, np.float32)
  for start in range(0, height, band_rows):
    start = min(start, height - band_rows)
    top = min(max(start - BAND_HALO, 0), height - window)
    rows = slice(top, top + window)
    band_mask, band_depth = refine(bg[:, rows], fg_bg[:, rows], mask_logits[:, rows],
                                   depth_logits[:, rows])
    keep = slice(start - top, start - top + band_rows)
    mask[:, start:start + band_rows] = np.asarray(band_mask)[:, keep]
    depth[:, start:start + band_rows] = np.asarray(band_depth)[:, keep]
  return mask, depth


class Cascade:
  """A trained model applied at any size: base at `cascade_sizes`' first level, refiner after.

  Called on normalised float32 NHWC photos at their own size, it returns the mask probability
  and depth in [0, 1] at that size. Each distinct size compiles its levels once.
  """

  def __init__(self, model: nn.Module, variables, base_resolution: int, *,
               max_band_pixels: int = 1 << 19):
    self.variables = variables
    self.base_resolution = base_resolution
    self.refined = isinstance(model, Refined)
    self.max_band_pixels = max_band_pixels
    if self.refined:
      base = lambda v, bg, fg_bg: model.apply(v, bg, fg_bg, method="coarse")
    else:
      base = lambda v, bg, fg_bg: model.apply(v, bg, fg_bg, train=False)
    self._base = jax.jit(lambda v, bg, fg_bg: _float32_logits(base(v, bg, fg_bg)))
    self._refine = jax.jit(functools.partial(model.apply, method="refine"))
    self._resize = jax.jit(resize, static_argnums=(1, 2))

  def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
    return cascade_sizes(height, width, self.base_resolution, self.refined)

  def logits(self, bg: Array, fg_bg: Array) -> tuple[Array, Array]:
    height, width = bg.shape[1:3]
    # A photo smaller than what the levels need is enlarged first (and the outputs shrunk back):
    # the base would otherwise see objects smaller than it was trained on.
    smallest = self.base_resolution * (REFINE_FACTOR if self.refined else 1)
    scale = max(1.0, smallest / max(height, width))
    work_height, work_width = round(height * scale), round(width * scale)
    bg, fg_bg = (self._resize(x, work_height, work_width) for x in (bg, fg_bg))
    sizes = self.sizes(work_height, work_width)
    mask, depth = self._base_logits(bg, fg_bg, *sizes[0])
    depth_size = cascade_sizes(work_height, work_width, self.base_resolution, self.refined,
                               DEPTH_BASE_ZOOM)[0]
    output_depth = depth if depth_size == sizes[0] else self._base_logits(bg, fg_bg,
                                                                          *depth_size)[1]
    refine = functools.partial(self._refine, self.variables)
    for level_height, level_width in sizes[1:]:
      level_bg, level_fg_bg = (self._resize(x, level_height, level_width) for x in (bg, fg_bg))
      mask, depth = (self._resize(x, level_height, level_width) for x in (mask, depth))
      band_rows = max(self.max_band_pixels // level_width, 4 * BAND_HALO)
      mask, depth = refine_in_bands(refine, level_bg, level_fg_bg, mask, depth, band_rows)
    return (self._resize(jnp.asarray(mask), height, width),
            self._resize(output_depth, height, width))

  def _base_logits(self, bg: Array, fg_bg: Array, height: int,
                   width: int) -> tuple[Array, Array]:
    """The base's logits for the photos resized to (height, width), padded as it needs."""
    padded = padded_size(height, width)
    small = [pad_to(self._resize(x, height, width), *padded) for x in (bg, fg_bg)]
    return tuple(x[:, :height, :width] for x in self._base(self.variables, *small))

  def __call__(self, bg, fg_bg) -> tuple[np.ndarray, np.ndarray]:
    mask, depth = self.logits(jnp.asarray(bg, jnp.float32), jnp.asarray(fg_bg, jnp.float32))
    return np.asarray(jax.nn.sigmoid(mask)), np.asarray(jax.nn.sigmoid(depth))


def _float32_logits(outputs: dict[str, Array]) -> tuple[Array, Array]:
  return outputs["mask"].astype(jnp.float32), outputs["depth"].astype(jnp.float32)
