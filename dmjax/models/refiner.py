"""Sharp outputs at any photo size: a base network at a fraction of the resolution, then a small
refiner that sharpens its logits one 2x step at a time, using the full-resolution photos.

This is BackgroundMattingV2's split (a base network at low resolution, a light refiner at full
resolution). In training, `Refined` runs its base at half the input size and one refiner step
back to it; how a trained model meets photos of other sizes is `dmjax.inference.cascade`. The
refiner only corrects what the upsampled logits leave uncertain (its last conv starts at zero,
so an untrained refiner returns the upsampled logits) and needs a few pixels of context: after
a 2x step the uncertain band is a pixel or two wide.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax.models import layers

Array = jax.Array

REFINE_FACTOR = 2  # The base runs at 1/2 of the training input size.


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


def input_factor(model: nn.Module) -> int:
  """A model's input size over its base network's working size: 2 for `Refined`, else 1."""
  return REFINE_FACTOR if isinstance(model, Refined) else 1


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
