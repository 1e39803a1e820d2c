"""Seed 004's shared ResNet encoder with two U-Net decoders (MODELS.md §1): 3,165,170 parameters.

Layer for layer as mpaditya's `S15/model_1.py` `Net(BasicBlock, dropout=0.0)`, so that its
weights import one to one (`dmjax.import_torch --model=unet_dual`). Submodule names are the
original's state-dict names with `.N` written `_N` (`encoder.layer3.0.shortcut.1` ->
`encoder/layer3_0/shortcut_1`).

- Encoder: bg and fg_bg each through conv3x3 3->32 + BN + ReLU and two BasicBlocks (32 @ H), the
  two concatenated [bg, fg_bg] (out_1, 64 @ H), two BasicBlocks with stride 2 to 128 @ H/2
  (out_2) and two more to 256 @ H/4 (out_4). All 20 encoder convs are bias-free and followed by
  BatchNorm; these hold the model's 4,480 BatchNorm statistics.
- Two DenseDepth-style decoders, mask with F = 64 features and depth with F = 128: conv1x1
  256 -> F on out_4, then twice [2x2 stride-2 transposed conv, concat [upsampled, skip], two
  conv3x3 + activation], then conv3x3 -> 1 logits. No BatchNorm in the decoders.

The decoder activation: the logged run used LeakyReLU(0.2) (its torchsummary lists LeakyReLU
layers); the stored code has `nn.ReLU(0.2)`, which is a plain ReLU (0.2 goes to `inplace`).
`decoder_activation` chooses; the weights are the same either way.

H and W must be multiples of 4: stride-2 convs give ceil(H/2), and the skip concatenations need
2·ceil(H/2) = H at both levels. The original had no size matching and failed on other sizes.
The original's outputs were raw conv outputs; here they are the logits, as for every model.
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

Array = jax.Array

SIZE_MULTIPLE = 4
STEM_FEATURES = 32
MASK_FEATURES = 64  # Decoder(F): int(256 · 0.25).
DEPTH_FEATURES = 128  # int(256 · 0.5).
LEAKY_SLOPE = 0.2
DECODER_ACTIVATIONS = ("leaky_relu", "relu")


class BasicBlock(nn.Module):
  """ResNet basic block: conv3x3 (stride s) + BN + ReLU, conv3x3 + BN, + shortcut, ReLU.

  The shortcut is the identity unless the stride or the width changes; then conv1x1 (stride s)
  + BN, named `shortcut_0` and `shortcut_1` as the original's `shortcut.0` / `shortcut.1`.
  """

  features: int
  stride: int = 1
  dilation: int = 1  # Of both 3x3 convs (padding = dilation), as in DRN (two_stage).
  kernel_init: layers.Initializer = layers.torch_conv_init
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    in_features = x.shape[-1]
    conv = functools.partial(layers.torch_conv, dtype=self.dtype, use_bias=False,
                             kernel_init=self.kernel_init)
    y = conv(self.features, 3, in_features=in_features, stride=self.stride,
             dilation=self.dilation, name="conv1")(x)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(y))
    y = conv(self.features, 3, in_features=self.features, dilation=self.dilation,
             name="conv2")(y)
    y = layers.batch_norm(train, self.dtype, name="bn2")(y)
    if self.stride != 1 or in_features != self.features:
      x = conv(self.features, 1, in_features=in_features, stride=self.stride,
               name="shortcut_0")(x)
      x = layers.batch_norm(train, self.dtype, name="shortcut_1")(x)
    return nn.relu(y + x)


class Encoder(nn.Module):
  """Two full-resolution branches (bg, fg_bg), concatenated, then two stride-2 stages."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, train: bool) -> tuple[Array, Array, Array]:
    branches = []
    for k, image in ((1, bg), (2, fg_bg)):
      x = layers.torch_conv(STEM_FEATURES, 3, self.dtype, in_features=3, use_bias=False,
                            name=f"conv{k}")(image)
      x = nn.relu(layers.batch_norm(train, self.dtype, name=f"bn{k}")(x))
      for i in range(2):
        x = BasicBlock(STEM_FEATURES, dtype=self.dtype, name=f"layer{k}_{i}")(x, train)
      branches.append(x)
    out_1 = jnp.concatenate(branches, axis=-1)
    x = out_1
    outputs = [out_1]
    for k, features in ((3, 128), (4, 256)):
      x = BasicBlock(features, stride=2, dtype=self.dtype, name=f"layer{k}_0")(x, train)
      x = BasicBlock(features, dtype=self.dtype, name=f"layer{k}_1")(x, train)
      outputs.append(x)
    out_1, out_2, out_4 = outputs
    return out_1, out_2, out_4


class UpBlock(nn.Module):
  """2x transposed conv, concat [upsampled, skip], conv3x3 + act twice (`up`, `convA`, `convB`)."""

  features: int
  activation: str = "leaky_relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array) -> Array:
    act = _activation(self.activation)
    x = layers.ConvTranspose2x2(x.shape[-1], self.dtype, name="up")(x)
    x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    x = act(layers.torch_conv(self.features, 3, self.dtype, in_features=x.shape[-1],
                              name="convA")(x))
    return act(layers.torch_conv(self.features, 3, self.dtype, in_features=self.features,
                                 name="convB")(x))


class Decoder(nn.Module):
  """DenseDepth-style decoder with F features: H/4 -> H/2 -> H, one logit channel."""

  features: int
  activation: str = "leaky_relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, out_1: Array, out_2: Array, out_4: Array) -> Array:
    f = self.features
    x = layers.torch_conv(f, 1, self.dtype, in_features=out_4.shape[-1], name="conv2")(out_4)
    x = UpBlock(f // 2, self.activation, self.dtype, name="up1")(x, out_2)
    x = UpBlock(f // 4, self.activation, self.dtype, name="up2")(x, out_1)
    return layers.torch_conv(1, 3, self.dtype, in_features=f // 4, name="conv3")(x)


def _activation(name: str):
  if name == "leaky_relu":
    return lambda x: nn.leaky_relu(x, LEAKY_SLOPE)
  if name == "relu":
    return nn.relu
  raise errors.UserError(f"decoder_activation={name!r}: expected one of {DECODER_ACTIVATIONS}")


@register("unet_dual")
class UNetDual(nn.Module):
  """Seed 004: shared two-branch ResNet encoder, a mask and a depth U-Net decoder."""

  decoder_activation: str = "leaky_relu"
  input_norm: str = "dataset"  # layers.INPUT_NORMS; the seed saw rgb in [0, 1] ("unit").
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bg: Array, fg_bg: Array, train: bool = False) -> dict[str, Array]:
    layers.check_inputs(bg, fg_bg, multiple=SIZE_MULTIPLE)
    _activation(self.decoder_activation)  # Fails early on a bad name.
    bg, fg_bg = layers.renormalize_inputs(bg, fg_bg, self.input_norm)
    out_1, out_2, out_4 = Encoder(self.dtype, name="encoder")(
        bg.astype(self.dtype), fg_bg.astype(self.dtype), train)
    mask = Decoder(MASK_FEATURES, self.decoder_activation, self.dtype, name="decoder_m")(
        out_1, out_2, out_4)
    depth = Decoder(DEPTH_FEATURES, self.decoder_activation, self.dtype, name="decoder_d")(
        out_1, out_2, out_4)
    return layers.as_float32_outputs(mask, depth)
