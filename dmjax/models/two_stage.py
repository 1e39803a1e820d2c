"""Two-stage model in the spirit of seed 001 (MODELS.md §3.3): mask first, then depth from it.

Stage 1 (`MaskAutoED`, the original's mask network with bg as well) predicts the mask from
[bg, fg_bg]: a DRN-D-22-layout dilated encoder (widths w · (16, 32, 64, 128, 256, 512, 512,
512)) and three UpProjections back to H. Stage 2 (`DepthHu`, Hu et al. 2019's E-D-MFF-R depth
network on a from-scratch ResNet-18-layout encoder with channels bc) predicts depth from fg_bg and
the stage-1 mask, at H/2, resized bilinearly to H.

Variants (`variant`): "S" (default; w 0.25, bc (32, 64, 128, 256)): 5,767,154 parameters, 10,192
BatchNorm statistics; "full" (the original widths, w 1, bc (64, 128, 256, 512)): 40,149,074.

Stage 2's input (`stage2_input`), m̂ = sigmoid(mask logits) with its gradient stopped, so each
stage learns from its own loss as in the original, where one network learned per loss:
  concat    [fg_bg, m̂] (default): the background keeps its pixels, whose depth is wanted too;
  multiply  fg_bg · m̂, the original's `model(img * mask)`;
  both      [fg_bg, fg_bg · m̂, m̂].
Teacher forcing (`teacher_forcing_steps` > 0): in training, each example's stage 2 sees the
ground-truth mask instead of m̂ with a probability annealed linearly from 0.5 at step 0 to 0 at
that step (train.py passes `mask_label`, `step` and a `teacher_forcing` rng, see
`models.train_inputs`).

Inits as the originals: DRN and ResNet trunk convs N(0, 2 / (k² · out)), the UpProjections, D,
MFF and R PyTorch's defaults. Any H, W work (every upsampling resizes to a target size); with
multiples of 32 no level is rounded.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax import errors
from dmjax.models import layers
from dmjax.models.registry import register
from dmjax.models.unet_dual import BasicBlock

Array = jax.Array

# (stage-1 width multiplier, stage-2 block channels).
VARIANTS = {"S": (0.25, (32, 64, 128, 256)), "full": (1.0, (64, 128, 256, 512))}
DRN_WIDTHS = (16, 32, 64, 128, 256, 512, 512, 512)
MFF_FEATURES = 16  # Per encoder block; four of them.
STAGE2_INPUTS = ("concat", "multiply", "both")
TEACHER_FORCING_START = 0.5

# Original (DRN, torchvision ResNet) trunk init: N(0, sqrt(2 / (k·k·out))), untruncated.
trunk_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nn.Module):
  """Bias-free conv (explicit symmetric padding) -> BatchNorm -> optional ReLU."""

  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  relu: bool = True
  kernel_init: layers.Initializer = layers.torch_conv_init
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = layers.torch_conv(self.features, self.kernel, self.dtype, in_features=x.shape[-1],
                          stride=self.stride, dilation=self.dilation, use_bias=False,
                          kernel_init=self.kernel_init, name="conv")(x)
    x = layers.batch_norm(train, self.dtype, name="bn")(x)
    return nn.relu(x) if self.relu else x


class UpProjection(nn.Module):
  """Hu et al.'s up-projection: bilinear resize to `size`, then
  relu(BN(conv3x3(relu(BN(conv5x5(x))))) + BN(conv5x5'(x)))."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int], train: bool) -> Array:
    x = layers.resize_bilinear(x, *size)
    main = ConvBN(self.features, 5, dtype=self.dtype, name="branch1")(x, train)
    main = ConvBN(self.features, 3, relu=False, dtype=self.dtype, name="branch1_2")(main, train)
    shortcut = ConvBN(self.features, 5, relu=False, dtype=self.dtype, name="branch2")(x, train)
    return nn.relu(main + shortcut)


def _blocks(x: Array, features: int, stride: int, dilation: int, dtype, name: str,
            train: bool) -> Array:
  """Two basic blocks, the first with the stride and (if the shape changes) a projection."""
  block = functools.partial(BasicBlock, features, dilation=dilation, kernel_init=trunk_init,
                            dtype=dtype)
  x = block(stride=stride, name=f"{name}_0")(x, train)
  return block(name=f"{name}_1")(x, train)


class MaskAutoED(nn.Module):
  """Stage 1: DRN-D-22 layout encoder to H/8, three UpProjections to H, one logit channel."""

  width: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = [round(self.width * w) for w in DRN_WIDTHS]
    full_size = x.shape[1:3]
    trunk = functools.partial(ConvBN, kernel_init=trunk_init, dtype=self.dtype)
    x = trunk(c[0], 7, name="layer0")(x, train)
    x = trunk(c[0], 3, name="layer1")(x, train)
    half = trunk(c[1], 3, stride=2, name="layer2")(x, train)
    quarter = _blocks(half, c[2], 2, 1, self.dtype, "layer3", train)
    x = _blocks(quarter, c[3], 2, 1, self.dtype, "layer4", train)
    x = _blocks(x, c[4], 1, 2, self.dtype, "layer5", train)
    x = _blocks(x, c[5], 1, 4, self.dtype, "layer6", train)
    x = trunk(c[6], 3, dilation=2, name="layer7")(x, train)
    x = trunk(c[7], 3, name="layer8")(x, train)
    f = c[7]
    x = UpProjection(f // 2, self.dtype, name="up1")(x, quarter.shape[1:3], train)
    x = UpProjection(f // 4, self.dtype, name="up2")(x, half.shape[1:3], train)
    x = UpProjection(f // 8, self.dtype, name="up3")(x, full_size, train)
    return layers.torch_conv(1, 3, self.dtype, in_features=f // 8, name="conv")(x)


def _size_of(x: Array, scale: int) -> tuple[int, int]:
  return x.shape[1] * scale, x.shape[2] * scale


class DepthHu(nn.Module):
  """Stage 2: ResNet-18-layout encoder, decoder D, multi-scale fusion MFF, refinement R (H/2)."""

  channels: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    bc = self.channels
    x = ConvBN(bc[0], 7, stride=2, kernel_init=trunk_init, dtype=self.dtype, name="stem")(x, train)
    # MaxPool2d(3, 2, 1): padded with -inf, as PyTorch pads.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    blocks = []
    for k, (features, stride) in enumerate(zip(bc, (1, 2, 2, 2), strict=True), start=1):
      x = _blocks(x, features, stride, 1, self.dtype, f"layer{k}", train)
      blocks.append(x)
    out_size = _size_of(blocks[0], 2)  # 2 · H/4 = H/2.

    d = ConvBN(bc[3] // 2, 1, dtype=self.dtype, name="D_conv")(blocks[3], train)
    targets = [blocks[2].shape[1:3], blocks[1].shape[1:3], blocks[0].shape[1:3], out_size]
    for k, size in enumerate(targets, start=1):
      d = UpProjection(bc[3] // 2**(k + 1), self.dtype, name=f"D_up{k}")(d, size, train)

    fused = [UpProjection(MFF_FEATURES, self.dtype, name=f"MFF_up{k}")(block, out_size, train)
             for k, block in enumerate(blocks, start=1)]
    mff = ConvBN(4 * MFF_FEATURES, 5, dtype=self.dtype, name="MFF_conv")(
        jnp.concatenate(fused, axis=-1), train)

    x = jnp.concatenate([d, mff], axis=-1)
    features = x.shape[-1]
    x = ConvBN(features, 5, dtype=self.dtype, name="R_conv0")(x, train)
    x = ConvBN(features, 5, dtype=self.dtype, name="R_conv1")(x, train)
    return layers.torch_conv(1, 5, self.dtype, in_features=features, name="R_conv2")(x)


@register("two_stage")
class TwoStage(nn.Module):
  """Mask from [bg, fg_bg] (stage 1), then depth from [fg_bg, predicted mask] (stage 2)."""

  variant: str = "S"  # two_stage only: a key of VARIANTS.
  stage2_input: str = "concat"  # One of STAGE2_INPUTS.
  teacher_forcing_steps: int = 0  # 0 = no teacher forcing.
  dtype: Any = jnp.float32

  @property
  def uses_teacher_forcing(self) -> bool:
    return self.teacher_forcing_steps > 0

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, train: bool = False, mask_label: Array | None = None,
               step: Array | None = None) -> dict[str, Array]:
    layers.check_inputs(bg, fg_bg, multiple=1)
    if self.variant not in VARIANTS:
      raise errors.UserError(f"variant={self.variant!r}: expected one of {sorted(VARIANTS)}")
    if self.stage2_input not in STAGE2_INPUTS:
      raise errors.UserError(f"stage2_input={self.stage2_input!r}: expected one of {STAGE2_INPUTS}")
    width, channels = VARIANTS[self.variant]
    bg, fg_bg = bg.astype(self.dtype), fg_bg.astype(self.dtype)
    mask_logits = MaskAutoED(width, self.dtype, name="stage1")(
        jnp.concatenate([bg, fg_bg], axis=-1), train)

    mask = jax.lax.stop_gradient(jax.nn.sigmoid(mask_logits.astype(jnp.float32)))
    if train and self.uses_teacher_forcing and mask_label is not None:
      step = jnp.zeros((), jnp.int32) if step is None else step
      mask = teacher_forced(mask, mask_label, step, self.teacher_forcing_steps,
                            self.make_rng("teacher_forcing"))
    mask = mask.astype(self.dtype)
    if self.stage2_input == "concat":
      x = jnp.concatenate([fg_bg, mask], axis=-1)
    elif self.stage2_input == "multiply":
      x = fg_bg * mask
    else:
      x = jnp.concatenate([fg_bg, fg_bg * mask, mask], axis=-1)
    depth_logits = DepthHu(channels, self.dtype, name="stage2")(x, train)
    depth_logits = layers.resize_bilinear(depth_logits, *bg.shape[1:3])
    return layers.as_float32_outputs(mask_logits, depth_logits)


def teacher_forced(mask: Array, mask_label: Array, step: Array, steps: int, key: Array) -> Array:
  """Each example's mask replaced by its label with probability 0.5 · max(0, 1 − step / steps)."""
  probability = TEACHER_FORCING_START * jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / steps,
                                                 0.0, 1.0)
  use_label = jax.random.bernoulli(key, probability, (mask.shape[0], 1, 1, 1))
  return jnp.where(use_label, jnp.asarray(mask_label, jnp.float32), mask)
