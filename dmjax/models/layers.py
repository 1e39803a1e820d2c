"""Building blocks shared by the models: pixel shuffle, initialisers, blur, input checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax.models import cpu_conv

Array = jax.Array
Initializer = Callable[..., Array]

# PyTorch's default conv initialisation, U(±1/sqrt(fan_in)): variance 1/(3·fan_in).
torch_conv_init: Initializer = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# Every model's inputs must survive four 2x poolings and come back to the same size.
SIZE_MULTIPLE = 16


def check_inputs(bg: Array, fg_bg: Array) -> None:
  """Raises ValueError unless bg and fg_bg are equal NHWC batches with H, W divisible by 16."""
  if bg.ndim != 4 or bg.shape != fg_bg.shape:
    raise ValueError(f"bg and fg_bg must be NHWC arrays of the same shape; got {bg.shape} and "
                     f"{fg_bg.shape}")
  height, width = bg.shape[1:3]
  if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
    raise ValueError(f"image height and width must be divisible by {SIZE_MULTIPLE}; got "
                     f"{height}x{width}")


def pixel_shuffle(x: Array, r: int) -> Array:
  """PyTorch's `PixelShuffle(r)` in NHWC: (B, H, W, C·r²) -> (B, H·r, W·r, C).

  Input channel c·r² + i·r + j lands at sub-pixel (i, j) of output channel c, as in PyTorch, so
  weights imported from the original keep their meaning. TensorFlow's depth_to_space factors the
  channels as (i, j, c) instead.
  """
  batch, height, width, channels = x.shape
  if channels % (r * r):
    raise ValueError(f"pixel_shuffle: {channels} channels are not divisible by r²={r * r}")
  out_channels = channels // (r * r)
  x = x.reshape(batch, height, width, out_channels, r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(batch, height * r, width * r, out_channels)


def pixel_unshuffle(x: Array, r: int) -> Array:
  """Inverse of `pixel_shuffle`, PyTorch's `PixelUnshuffle`: (B, H·r, W·r, C) -> (B, H, W, C·r²)."""
  batch, height, width, channels = x.shape
  if height % r or width % r:
    raise ValueError(f"pixel_unshuffle: {height}x{width} is not divisible by r={r}")
  x = x.reshape(batch, height // r, r, width // r, r, channels)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(batch, height // r, width // r, channels * r * r)


def icnr_init(r: int, base_init: Initializer = torch_conv_init) -> Initializer:
  """ICNR initialiser (Aitken et al. 2017) for a conv feeding `pixel_shuffle(·, r)`.

  Draws one kernel per shuffled output channel and copies it into that channel's r² sub-pixel
  slots, so at initialisation the shuffle behaves like nearest-neighbour upsampling and starts
  free of checkerboard. With PyTorch's order the slots of channel c are the r² consecutive
  conv outputs c·r² … c·r² + r² - 1, hence a repeat along the output axis.
  """

  def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
    *spatial_and_in, out_features = shape
    if out_features % (r * r):
      raise ValueError(f"icnr_init: {out_features} output features are not divisible by "
                       f"r²={r * r}")
    sub_kernel = base_init(key, (*spatial_and_in, out_features // (r * r)), dtype)
    return jnp.repeat(sub_kernel, r * r, axis=-1)

  return init


def binomial_blur(x: Array) -> Array:
  """Depthwise 3x3 binomial blur ([1, 2, 1]² / 16) with reflect padding; keeps the shape.

  After a 2x pixel shuffle it removes the period-2 (checkerboard) component exactly while keeping
  the image centred, unlike the 2x2 average used by Sugawara et al. which shifts by half a pixel.
  Reflect (not edge) padding keeps that true at the border: the mirrored neighbour has the
  opposite phase, as an interior one does.
  """

  def blur_axis(y: Array, axis: int) -> Array:
    padded = jnp.pad(y, [(1, 1) if a == axis else (0, 0) for a in range(y.ndim)], mode="reflect")
    size = y.shape[axis]
    before = jax.lax.slice_in_dim(padded, 0, size, axis=axis)
    centre = jax.lax.slice_in_dim(padded, 1, size + 1, axis=axis)
    after = jax.lax.slice_in_dim(padded, 2, size + 2, axis=axis)
    return (before + 2 * centre + after) * 0.25

  return blur_axis(blur_axis(x, 1), 2)


def batch_norm(train: bool, dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here), float32 parameters."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, dtype, *, dilation: int = 1, name: str | None = None,
         kernel_init: Initializer = torch_conv_init) -> nn.Conv:
  """Bias-free 'same' conv (padding = dilation · (kernel - 1) / 2, as the originals used).

  Its kernel gradient on CPU is computed as in `cpu_conv`, several times faster than XLA's own.
  """
  return nn.Conv(features, (kernel, kernel), padding="SAME", kernel_dilation=dilation,
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                 conv_general_dilated=cpu_conv.conv_general_dilated, name=name)


class ConvBNReLU(nn.Module):
  """Bias-free conv -> BatchNorm -> ReLU."""

  features: int
  kernel: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = conv(self.features, self.kernel, self.dtype, dilation=self.dilation, name="conv")(x)
    x = batch_norm(train, self.dtype, name="bn")(x)
    return nn.relu(x)


def max_pool_2x2(x: Array) -> Array:
  """2x2 max pooling with stride 2 (H and W even).

  Written as a reshape and a max rather than `nn.max_pool`: same values, but its gradient is a
  cheap elementwise select instead of XLA's select-and-scatter, several times faster on CPU.
  """
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def as_float32_outputs(mask: Array, depth: Array) -> dict[str, Array]:
  return {"mask": mask.astype(jnp.float32), "depth": depth.astype(jnp.float32)}
