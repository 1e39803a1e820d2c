"""Sums over a batch that the losses and the metrics share: per image, and over examples with
padding masked out.

An evaluation batch is padded to a fixed shape with examples of weight 0 (`example_weight`).
Their values are masked with `where` rather than multiplied by 0, so that a NaN or infinity in a
padding example (a division by an empty mask, say) cannot leak into the sum.
"""

from __future__ import annotations

import jax.numpy as jnp


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
