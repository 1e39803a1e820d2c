"""Building blocks shared by the models: pixel shuffle, initialisers, blur, input checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dmjax import errors
from dmjax.data import schema
from dmjax.models import cpu_conv

Array = jax.Array
Initializer = Callable[..., Array]

# PyTorch's default conv initialisation, U(±1/sqrt(fan_in)): variance 1/(3·fan_in).
torch_conv_init: Initializer = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# Every model's inputs must survive four 2x poolings and come back to the same size.
SIZE_MULTIPLE = 16


def check_inputs(bg: Array, fg_bg: Array, multiple: int = SIZE_MULTIPLE) -> None:
  """Raises ValueError unless bg and fg_bg are equal NHWC batches with H, W divisible by
  `multiple` (16 unless the model says otherwise)."""
  if bg.ndim != 4 or bg.shape != fg_bg.shape:
    raise errors.UserError(f"bg and fg_bg must be NHWC arrays of the same shape; got {bg.shape} "
                           f"and {fg_bg.shape}")
  height, width = bg.shape[1:3]
  if height % multiple or width % multiple:
    raise errors.UserError(f"image height and width must be divisible by {multiple}; got "
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


# PyTorch-parity building blocks (the other seed models, /work/shared/MODELS.md §0): explicit
# symmetric padding, biases, stride 2, transposed convolutions, ceil-mode pooling, bilinear
# resizing to a target size.


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias initialisation, U(±1/sqrt(fan_in)) with the layer's fan_in."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_conv(features: int, kernel: int, dtype, *, in_features: int, stride: int = 1,
               padding: int | None = None, dilation: int = 1, use_bias: bool = True,
               kernel_init: Initializer = torch_conv_init, name: str | None = None) -> nn.Conv:
  """PyTorch's `Conv2d(in_features, features, kernel, stride, padding, dilation, bias)`.

  Padding is explicit and symmetric (default dilation · (kernel - 1) / 2): Flax's 'SAME' pads
  (0, 1) for a stride-2 3x3 conv on an even input where PyTorch pads (1, 1), which would shift
  the sampling grid by a pixel. Unit-stride convs take `cpu_conv`'s fast kernel gradient.
  """
  pad = dilation * (kernel - 1) // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 kernel_dilation=dilation, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kernel_init,
                 bias_init=torch_bias_init(in_features * kernel * kernel),
                 conv_general_dilated=cpu_conv.conv_general_dilated, name=name)


class ConvTranspose2x2(nn.Module):
  """PyTorch's `ConvTranspose2d(in, features, kernel_size=2, stride=2)`: exactly 2x up.

  With kernel 2 and stride 2 the output blocks do not overlap, so the layer is one matrix
  product: y[n, 2h+i, 2w+j, o] = b[o] + Σ_c x[n, h, w, c] · W[i, j, c, o]. The kernel is stored
  as `transpose_kernel` (2, 2, in, out) = PyTorch's (in, out, 2, 2) weight transposed (2, 3, 0, 1)
  without a spatial flip (the name tells the weight importer which layout it is). Initialised as
  PyTorch does, whose "fan_in" for this layer is out · 2 · 2 (weight dimension 1).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = self.features * 4
    kernel = self.param("transpose_kernel", torch_bias_init(fan_in),
                        (2, 2, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,), jnp.float32)
    y = jnp.einsum("nhwc,ijco->nhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
    batch, height, _, width, _, features = y.shape
    return y.reshape(batch, 2 * height, 2 * width, features) + bias.astype(self.dtype)


def max_pool_2x2_ceil(x: Array) -> Array:
  """PyTorch's `MaxPool2d(2, 2, ceil_mode=True)`: an odd side keeps its last row / column alone.

  Padding with -inf makes the extra window the maximum of the real values it covers.
  """
  height, width = x.shape[1:3]
  if height % 2 or width % 2:
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), constant_values=-jnp.inf)
  return max_pool_2x2(x)


def resize_bilinear(x: Array, height: int, width: int) -> Array:
  """`F.interpolate(x, size=(height, width), mode='bilinear', align_corners=False)` in NHWC.

  Equal to `jax.image.resize(..., "bilinear")` for the upsizing these models do (MODELS.md §0:
  antialiasing only applies when shrinking).
  """
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")


def resize_like(x: Array, reference: Array) -> Array:
  return resize_bilinear(x, *reference.shape[1:3])


# How the seed models saw their photos; every model receives them standardised with the dataset's
# channel statistics (dmjax.data.schema) and converts them here, so that data pipelines,
# evaluation and prediction stay the same for all of them.
INPUT_NORMS = ("dataset", "unit", "image_max")


def renormalize_inputs(bg: Array, fg_bg: Array, input_norm: str) -> tuple[Array, Array]:
  """Standardised photos -> what the model was trained on.

  dataset    unchanged: (rgb - mean) / std with the seed dataset's statistics.
  unit       rgb in [0, 1] (seed 004: ToTensor, no normalisation).
  image_max  rgb / max(rgb) over each photo's pixels and channels (seed 003: img / np.max(img)).
  """
  if input_norm == "dataset":
    return bg, fg_bg
  if input_norm not in INPUT_NORMS:
    raise errors.UserError(f"input_norm={input_norm!r}: expected one of {INPUT_NORMS}")

  def convert(image: Array, key: str) -> Array:
    mean = jnp.asarray(schema.PHOTO_MEAN[key], jnp.float32)
    std = jnp.asarray(schema.PHOTO_STD[key], jnp.float32)
    image = image.astype(jnp.float32) * std + mean
    if input_norm == "image_max":
      # A black photo (max 0) would divide by zero; the original would produce NaNs.
      image = image / jnp.maximum(jnp.max(image, axis=(1, 2, 3), keepdims=True), 1e-6)
    return image

  return convert(bg, "bg"), convert(fg_bg, "fg_bg")
