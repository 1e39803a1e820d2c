"""Sums over a batch that the losses and the metrics share: per image, and over examples with
padding masked out; and the per-image scale-and-shift fit of a depth map to its truth.

An evaluation batch is padded to a fixed shape with examples of weight 0 (`example_weight`).
Their values are masked with `where` rather than multiplied by 0, so that a NaN or infinity in a
padding example (a division by an empty mask, say) cannot leak into the sum.
"""

from __future__ import annotations

import jax.numpy as jnp

# Below this prediction variance per pixel an image is taken as constant: its scale is 0.
ALIGNMENT_MIN_VARIANCE = 1e-12


def per_image_sum(values: jnp.ndarray) -> jnp.ndarray:
  """(B, ...) → (B,): the sum of each example's values."""
  return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def per_image_mean(values: jnp.ndarray) -> jnp.ndarray:
  """(B, ...) → (B,): the mean of each example's values."""
  return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def masked(per_example: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """weight · value per example; 0 where the weight is 0, whatever the value."""
  return jnp.where(weight > 0, weight * per_example, 0.0)


def weighted_sum(per_example: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Σ weight · value over the examples, padding left out."""
  return jnp.sum(masked(per_example, weight))


def weighted_mean(per_example: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Σ weight · value / Σ weight over the examples, padding left out."""
  total_weight = jnp.sum(jnp.where(weight > 0, weight, 0.0))
  return weighted_sum(per_example, weight) / jnp.maximum(total_weight, 1e-12)


def fit_scale_and_shift(depth_pred, depth_true, valid):
  """Per image, (s, t), each (B, 1, 1, 1): the least-squares fit of s·pred + t to the truth over
  `valid` pixels; s = 0 (t the mean truth) where the prediction is constant."""
  valid = valid.astype(jnp.float32)
  count = per_image_sum(valid)
  safe_count = jnp.maximum(count, 1.0)
  pred_mean = per_image_sum(valid * depth_pred) / safe_count
  true_mean = per_image_sum(valid * depth_true) / safe_count
  pred_centred = depth_pred - pred_mean[:, None, None, None]
  true_centred = depth_true - true_mean[:, None, None, None]
  pred_variance = per_image_sum(valid * pred_centred**2)
  covariance = per_image_sum(valid * pred_centred * true_centred)
  degenerate = pred_variance <= ALIGNMENT_MIN_VARIANCE * count
  scale = jnp.where(degenerate, 0.0, covariance / jnp.where(degenerate, 1.0, pred_variance))
  shift = true_mean - scale * pred_mean
  return scale[:, None, None, None], shift[:, None, None, None]


def align_scale_and_shift(depth_pred, depth_true, valid):
  """Per image, the least-squares s·pred + t fitted to the truth over `valid` pixels."""
  scale, shift = fit_scale_and_shift(depth_pred, depth_true, valid)
  return scale * depth_pred + shift
