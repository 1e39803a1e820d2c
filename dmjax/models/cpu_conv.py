"""`lax.conv_general_dilated` with a kernel gradient that XLA's CPU backend computes much faster.

XLA:CPU lowers a convolution's kernel gradient (the correlation of the input with the output
gradient over batch and space) to a generic convolution that is slow when the image is large and
the channels few, several times slower than the same sums as matrix products (the figures are in
docs/benchmarks.md, "Closing the ratio on CPU"). Those gradients dominated the training step on
CPU.

Here the kernel gradient is one matrix product per kernel tap (i, j):
  dW[i, j] = Σ_{b, h, w} x_padded[b, h + i·d, w + j·d, :]ᵀ · dy[b, h, w, :]
the same sums as XLA's, in another order, so equal to float32 rounding (relative 1e-5). Only on
CPU (`lax.platform_dependent`): on GPUs the program is the one `lax.conv_general_dilated` gives,
cuDNN's kernel gradient included. Forward and input gradient are XLA's own everywhere.

Pass `conv_general_dilated` to `flax.linen.Conv(conv_general_dilated=...)`; parameters and the
forward pass do not change. Cases other than NHWC / HWIO, unit strides, no input dilation, one
feature group (all this project uses) go to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _native(x, kernel, padding, dilation, precision):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def kernel_grad_by_taps(x, dy, kernel_shape, padding, dilation, precision=None):
  """dL/dkernel of `_native` from its input `x` and output gradient `dy`, one product a tap."""
  (top, bottom), (left, right) = padding
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  batch, out_height, out_width, _ = dy.shape
  channels = x.shape[-1]

  def tap(i: int, j: int):
    start = (0, i * dilation[0], j * dilation[1], 0)
    window = lax.slice(x, start, (batch, start[1] + out_height, start[2] + out_width, channels))
    return jnp.einsum("bhwc,bhwo->co", window, dy, precision=precision,
                      preferred_element_type=jnp.float32)

  height, width = kernel_shape[:2]
  return jnp.stack([jnp.stack([tap(i, j) for j in range(width)]) for i in range(height)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, padding, dilation, precision):
  return _native(x, kernel, padding, dilation, precision)


def _conv_fwd(x, kernel, padding, dilation, precision):
  return _native(x, kernel, padding, dilation, precision), (x, kernel)


def _conv_bwd(padding, dilation, precision, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _native(x, kernel, padding, dilation, precision), x)

  def xla_kernel_grad(x, dy):
    _, kernel_vjp = jax.vjp(lambda k: _native(x, k, padding, dilation, precision), kernel)
    return kernel_vjp(dy)[0]

  def taps_kernel_grad(x, dy):
    return kernel_grad_by_taps(x, dy, kernel.shape, padding, dilation,
                               precision).astype(kernel.dtype)

  kernel_grad = lax.platform_dependent(x, dy, cpu=taps_kernel_grad, default=xla_kernel_grad)
  return input_vjp(dy)[0], kernel_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with the CPU kernel gradient above where it applies."""
  native = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if lhs.ndim != 4 or rhs.ndim != 4:
    return native(lhs, rhs)
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  dilation = tuple(rhs_dilation or (1, 1))
  if (numbers != _NHWC or tuple(window_strides) != (1, 1) or any(d != 1 for d in lhs_dilation or ())
      or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type is not None):
    return native(lhs, rhs)
  if isinstance(padding, str):
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation, strict=True)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_kernel, (1, 1), padding)
  padding = tuple((int(low), int(high)) for low, high in padding)
  if any(p < 0 for pair in padding for p in pair):
    return native(lhs, rhs)
  return _conv(lhs, rhs, padding, dilation, precision)
