"""DepthMaskNet, the seed model (SPEC §1), layer for layer: 5,230,720 parameters.

Kept exact so that weights trained with the PyTorch original import one to one
(`dmjax.import_torch`) and so that it serves as the baseline. Its weaknesses (a linear decoder
without skips, checkerboard from untreated pixel shuffles, a ReLU before BatchNorm in the dilated
branch) are deliberate here; `depthmasknet_v2` fixes them.

Submodule names follow the original's state-dict keys: `bg` -> `bg_stem`, `bg_fg` -> `fg_bg_stem`,
`pointwise` -> `merge`, `encodeK.{normalconv,dilatedconv,Pointwise}` ->
`encodeK/{normalconv,dilatedconv,pointwise}`, `mask_decodeK.Pointwise` -> `mask_decodeK/pointwise`,
`mask_outputConv` -> `mask_output` (and the same for depth).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax.models import layers
from dmjax.models.registry import register

Array = jax.Array

STEM_FEATURES = 32
ENCODER_FEATURES = (64, 128, 256, 512)


class DilatedConvReLUBN(nn.Module):
  """conv3x3 with dilation 2 -> ReLU -> BatchNorm: the original's (unusual) order."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = layers.conv(self.features, 3, self.dtype, dilation=2, name="conv")(x)
    x = nn.relu(x)
    return layers.batch_norm(train, self.dtype, name="bn")(x)


class NormalDilatedConv(nn.Module):
  """Normal and dilated 3x3 branches side by side, fused by a linear conv1x1."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    normal = layers.ConvBNReLU(self.features, dtype=self.dtype, name="normalconv")(x, train)
    dilated = DilatedConvReLUBN(self.features, self.dtype, name="dilatedconv")(x, train)
    both = jnp.concatenate([normal, dilated], axis=-1)
    return layers.conv(self.features, 1, self.dtype, name="pointwise")(both)


class SuperRes(nn.Module):
  """conv1x1 c -> 2c, then a 2x pixel shuffle: c/2 channels at twice the resolution."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = layers.conv(2 * x.shape[-1], 1, self.dtype, name="pointwise")(x)
    return layers.pixel_shuffle(x, 2)


@register("depthmasknet")
class DepthMaskNet(nn.Module):
  """The seed DepthMaskNet: two stems, a dilated encoder to H/16, two linear shuffle heads."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, train: bool = False) -> dict[str, Array]:
    layers.check_inputs(bg, fg_bg)
    bg = layers.ConvBNReLU(STEM_FEATURES, dtype=self.dtype, name="bg_stem")(
        bg.astype(self.dtype), train)
    fg_bg = layers.ConvBNReLU(STEM_FEATURES, dtype=self.dtype, name="fg_bg_stem")(
        fg_bg.astype(self.dtype), train)
    x = layers.conv(STEM_FEATURES, 1, self.dtype, name="merge")(
        jnp.concatenate([bg, fg_bg], axis=-1))
    for k, features in enumerate(ENCODER_FEATURES, start=1):
      x = NormalDilatedConv(features, self.dtype, name=f"encode{k}")(x, train)
      x = layers.max_pool_2x2(x)
    return layers.as_float32_outputs(self._head("mask", x), self._head("depth", x))

  def _head(self, task: str, x: Array) -> Array:
    for k in range(1, len(ENCODER_FEATURES) + 1):
      x = SuperRes(self.dtype, name=f"{task}_decode{k}")(x)
    return layers.conv(1, 3, self.dtype, name=f"{task}_output")(x)
