"""Seed 003's U²-Net-P with a depth and a mask decoder (MODELS.md §2): 1,769,306 parameters.

Layer for layer as santhiya-v's `models/u2net.py` `U2NETP(in_ch=6, out_ch=1)`, so that its
weights import one to one (`dmjax.import_torch --model=u2netp_dual`); submodule names are the
original's state-dict names (`depth_stage3d/rebnconv2d/conv_s1`, `seg_side6`, ...), its `seg`
decoder being the mask.

- A shared nested-U encoder on the 6-channel [bg, fg_bg]: RSU7, RSU6, RSU5, RSU4, RSU4F, RSU4F,
  with ceil-mode 2x2 max pooling between stages (64 channels at H ... H/32).
- Per task, a decoder of five RSU stages (RSU4F at H/16 up to RSU7 at H), each on
  [bilinear-upsampled deeper features, encoder skip]; six 3x3 side convs to one channel (side 6
  on the encoder's deepest stage), each resized to H after the conv; a 1x1 conv fuses the six.

Every conv has a bias; every conv inside an RSU block is followed by BatchNorm and ReLU (164 of
them, 8,320 BatchNorm statistics). The original applied a sigmoid to all 14 maps; here they are
logits: `mask` and `depth` are the fused outputs, `mask_sides` and `depth_sides` the six side
outputs of each task stacked on the channel axis, (B, H, W, 6), which only the deep-supervision
loss (`loss.side_bce`) reads; evaluation and prediction read the fused outputs alone.

Any H, W >= 1 works: pooling rounds up and every upsampling resizes to its target's size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax.models import layers
from dmjax.models.registry import register

Array = jax.Array

STAGE_FEATURES = 64
MID_FEATURES = 16
NUM_SIDES = 6
TASKS = (("mask", "seg"), ("depth", "depth"))  # (output key, the original's prefix).


class REBNCONV(nn.Module):
  """conv3x3 with padding and dilation d, with bias -> BatchNorm -> ReLU."""

  features: int
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = layers.torch_conv(self.features, 3, self.dtype, in_features=x.shape[-1],
                          dilation=self.dilation, name="conv_s1")(x)
    return nn.relu(layers.batch_norm(train, self.dtype, name="bn_s1")(x))


class RSU(nn.Module):
  """Residual U-block RSU-L: a small U-Net of depth L inside one stage, plus the input."""

  height: int  # L: 7, 6, 5 or 4.
  mid_features: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    levels = self.height
    conv = lambda features, name, dilation=1: REBNCONV(features, dilation, self.dtype, name=name)
    hxin = conv(self.features, "rebnconvin")(x, train)
    skips = [conv(self.mid_features, "rebnconv1")(hxin, train)]
    for k in range(2, levels):  # Pool before each of rebnconv2 .. rebnconv(L-1).
      skips.append(conv(self.mid_features, f"rebnconv{k}")(
          layers.max_pool_2x2_ceil(skips[-1]), train))
    h = conv(self.mid_features, f"rebnconv{levels}", dilation=2)(skips[-1], train)
    h = conv(self.mid_features, f"rebnconv{levels - 1}d")(
        jnp.concatenate([h, skips[-1]], axis=-1), train)
    for k in range(levels - 2, 0, -1):
      skip = skips[k - 1]
      h = jnp.concatenate([layers.resize_like(h, skip), skip], axis=-1)
      h = conv(self.features if k == 1 else self.mid_features, f"rebnconv{k}d")(h, train)
    return h + hxin


class RSU4F(nn.Module):
  """RSU-4F: RSU-4 with dilations 1, 2, 4, 8 instead of pooling, all at the input resolution."""

  mid_features: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = lambda features, name, dilation: REBNCONV(features, dilation, self.dtype, name=name)
    mid = self.mid_features
    hxin = conv(self.features, "rebnconvin", 1)(x, train)
    hx1 = conv(mid, "rebnconv1", 1)(hxin, train)
    hx2 = conv(mid, "rebnconv2", 2)(hx1, train)
    hx3 = conv(mid, "rebnconv3", 4)(hx2, train)
    hx4 = conv(mid, "rebnconv4", 8)(hx3, train)
    hx3d = conv(mid, "rebnconv3d", 4)(jnp.concatenate([hx4, hx3], axis=-1), train)
    hx2d = conv(mid, "rebnconv2d", 2)(jnp.concatenate([hx3d, hx2], axis=-1), train)
    hx1d = conv(self.features, "rebnconv1d", 1)(jnp.concatenate([hx2d, hx1], axis=-1), train)
    return hx1d + hxin


def _stage(height: int, dtype, name: str) -> nn.Module:
  """RSU-L for L = 7, 6, 5, 4; RSU-4F for height 0."""
  if height == 0:
    return RSU4F(MID_FEATURES, STAGE_FEATURES, dtype, name=name)
  return RSU(height, MID_FEATURES, STAGE_FEATURES, dtype, name=name)


# Stage k's RSU height, encoder and decoder alike (0 = RSU-4F).
STAGE_HEIGHTS = {1: 7, 2: 6, 3: 5, 4: 4, 5: 0, 6: 0}


@register("u2netp_dual")
class U2NetPDual(nn.Module):
  """Seed 003: U²-Net-P encoder, two U²-Net decoders with deep-supervision side outputs."""

  input_norm: str = "dataset"  # layers.INPUT_NORMS; the seed divided each photo by its max.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, train: bool = False) -> dict[str, Array]:
    layers.check_inputs(bg, fg_bg, multiple=1)
    bg, fg_bg = layers.renormalize_inputs(bg, fg_bg, self.input_norm)
    x = jnp.concatenate([bg, fg_bg], axis=-1).astype(self.dtype)
    encoder = []  # hx1 .. hx6.
    for k in range(1, NUM_SIDES + 1):
      if k > 1:
        x = layers.max_pool_2x2_ceil(x)
      x = _stage(STAGE_HEIGHTS[k], self.dtype, f"stage{k}")(x, train)
      encoder.append(x)
    deepest_up = layers.resize_like(encoder[5], encoder[4])  # Shared by both decoders.
    outputs = {}
    for key, prefix in TASKS:
      fused, sides = self._decoder(prefix, encoder, deepest_up, train)
      outputs[key] = fused.astype(jnp.float32)
      outputs[f"{key}_sides"] = sides.astype(jnp.float32)
    return outputs

  def _decoder(self, prefix: str, encoder: list[Array], deepest_up: Array,
               train: bool) -> tuple[Array, Array]:
    h = deepest_up
    decoded = {}  # Stage k -> its decoder output, k = 5 .. 1.
    for k in range(5, 0, -1):
      skip = encoder[k - 1]
      h = jnp.concatenate([layers.resize_like(h, skip), skip], axis=-1)
      h = _stage(STAGE_HEIGHTS[k], self.dtype, f"{prefix}_stage{k}d")(h, train)
      decoded[k] = h
    decoded[6] = encoder[5]  # Side 6 reads the encoder's deepest stage.
    sides = []
    for k in range(1, NUM_SIDES + 1):
      # Conv at the stage's own resolution first, then resized to H.
      side = layers.torch_conv(1, 3, self.dtype, in_features=STAGE_FEATURES,
                               name=f"{prefix}_side{k}")(decoded[k])
      sides.append(layers.resize_like(side, decoded[1]))
    sides = jnp.concatenate(sides, axis=-1)
    fused = layers.torch_conv(1, 1, self.dtype, in_features=NUM_SIDES, name=f"{prefix}_out")(sides)
    return fused, sides
