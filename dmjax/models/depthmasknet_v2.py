"""DepthMaskNet v2: the seed's dilated encoder and pixel-shuffle heads with its weaknesses fixed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax.models import layers
from dmjax.models.registry import register

Array = jax.Array

SHUFFLE = 2  # Every upsampling step doubles the resolution, as in the seed.


class DilatedEncoderBlock(nn.Module):
  """The seed's NormalDilatedConv with conv -> BN -> ReLU in both branches and after the fuse."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    normal = layers.ConvBNReLU(self.features, dtype=self.dtype, name="normalconv")(x, train)
    dilated = layers.ConvBNReLU(self.features, dilation=2, dtype=self.dtype,
                                name="dilatedconv")(x, train)
    both = jnp.concatenate([normal, dilated], axis=-1)
    return layers.ConvBNReLU(self.features, kernel=1, dtype=self.dtype, name="pointwise")(
        both, train)


def _shuffle_up(x: Array, blur: bool) -> Array:
  x = layers.pixel_shuffle(x, SHUFFLE)
  return layers.binomial_blur(x) if blur else x


class ShuffleUpBlock(nn.Module):
  """2x up: ICNR conv1x1 + pixel shuffle (+ blur), concat the skip, conv3x3 -> BN -> ReLU."""

  features: int
  blur: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array, train: bool) -> Array:
    x = layers.conv(SHUFFLE**2 * self.features, 1, self.dtype,
                    kernel_init=layers.icnr_init(SHUFFLE), name="shuffle_conv")(x)
    x = _shuffle_up(x, self.blur)
    x = jnp.concatenate([x, skip], axis=-1)
    return layers.ConvBNReLU(self.features, dtype=self.dtype, name="fuse")(x, train)


class SubPixelOutput(nn.Module):
  """Full-resolution logits computed at half resolution, then pixel-shuffled.

  The full-resolution stem features enter space-to-depth (each 2x2 block as one vector), are
  fused with the decoder features by conv1x1 -> BN -> ReLU, and a conv3x3 predicts the four
  sub-pixel logits of every block.
  """

  features: int
  blur: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, full_res_skip: Array, train: bool) -> Array:
    x = jnp.concatenate([x, layers.pixel_unshuffle(full_res_skip, SHUFFLE)], axis=-1)
    x = layers.ConvBNReLU(self.features, kernel=1, dtype=self.dtype, name="fuse")(x, train)
    x = nn.Conv(SHUFFLE**2, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.icnr_init(SHUFFLE), name="shuffle_conv")(x)
    return _shuffle_up(x, self.blur)


@register("depthmasknet_v2")
class DepthMaskNetV2(nn.Module):
  """DepthMaskNet with a nonlinear U-Net decoder: the project's default model.

  Layout (w = `width`, default 8; 524,168 parameters and 2,000 batch-statistic numbers):

  - Stems and merge as in the seed (w channels at full resolution each), but the merge conv1x1
    is followed by BN + ReLU.
  - Encoder: four of the seed's normal + dilated blocks with 2w, 4w, 8w, 16w channels at H/2,
    H/4, H/8, H/16 (pool first, then the block). The seed ran its first block at full resolution
    and pooled after its last one, so its deepest block never saw H/16 features; here the full
    resolution is left to the stems and every block works on 4x fewer pixels. BN now follows
    every conv and precedes every ReLU (the seed had ReLU -> BN in the dilated branch and a linear
    fuse).
  - Two heads (mask, depth), each its own weights: three `ShuffleUpBlock`s to H/8, H/4, H/2 with
    8w, 4w, 2w channels. Each is an ICNR-initialised conv1x1 + pixel shuffle (the seed's
    SuperRes), an optional blur, concatenation of the encoder features of that resolution
    (U-Net skip), and conv3x3 -> BN -> ReLU, so the decoder is nonlinear and sees the encoder's
    detail; the seed's heads were linear maps of the H/16 features.
  - The last 2x step (`SubPixelOutput`) takes the merged full-resolution stem features as its
    skip, space-to-depth, and predicts the four sub-pixel logits per 2x2 block (ICNR again,
    then the shuffle and blur).

  Why this size: on the 2-core CPU the project trains on (batch 32 at 64x64), step time is
  dominated by full-resolution layers and, there, by the weight gradients of the convolutions.
  Running every decoder conv at H/2 or coarser and keeping the full-resolution stems at w = 8
  channels makes its step several times faster than the seed model's, which has 17x its FLOPs
  per image (step rows in docs/benchmarks.md).
  Parameters are far below the 8M budget because capacity is cheap in parameters but not in
  time; `width` scales every stage (16 gives 2.1M parameters).

  ICNR (`layers.icnr_init`) copies one kernel into the r² consecutive output channels that
  PyTorch's shuffle order sends to one output channel, so every shuffle starts as
  nearest-neighbour upsampling without checkerboard. The binomial blur after each shuffle
  (`blur=True`) removes the period-2 pattern outright, at a small cost in sharpness.
  """

  width: int = 8
  blur: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, train: bool = False) -> dict[str, Array]:
    layers.check_inputs(bg, fg_bg)
    w = self.width
    bg = layers.ConvBNReLU(w, dtype=self.dtype, name="bg_stem")(bg.astype(self.dtype), train)
    fg_bg = layers.ConvBNReLU(w, dtype=self.dtype, name="fg_bg_stem")(
        fg_bg.astype(self.dtype), train)
    x = layers.ConvBNReLU(w, kernel=1, dtype=self.dtype, name="merge")(
        jnp.concatenate([bg, fg_bg], axis=-1), train)
    full_res = x
    encoder_features = []  # At H/2, H/4, H/8, H/16.
    for k, features in enumerate((2 * w, 4 * w, 8 * w, 16 * w), start=1):
      x = layers.max_pool_2x2(x)
      x = DilatedEncoderBlock(features, self.dtype, name=f"encode{k}")(x, train)
      encoder_features.append(x)
    *skips, bottleneck = encoder_features
    mask = self._head("mask", bottleneck, skips, full_res, train)
    depth = self._head("depth", bottleneck, skips, full_res, train)
    return layers.as_float32_outputs(mask, depth)

  def _head(self, task: str, x: Array, skips: list[Array], full_res: Array, train: bool) -> Array:
    w = self.width
    decoder_features = (8 * w, 4 * w, 2 * w)  # At H/8, H/4, H/2.
    for k, (features, skip) in enumerate(zip(decoder_features, reversed(skips), strict=True), 1):
      x = ShuffleUpBlock(features, self.blur, self.dtype, name=f"{task}_decode{k}")(x, skip, train)
    return SubPixelOutput(2 * w, self.blur, self.dtype, name=f"{task}_output")(x, full_res, train)
