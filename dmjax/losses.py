"""Training losses for the mask and depth heads, in float32 whatever the compute dtype.

Both heads output logits of shape (B, H, W, 1); labels are float32 in [0, 1] of the same shape.

Mask (SPEC §3, seed 002):
  mask_bce   mean binary cross-entropy from logits.
  mask_dice  1 - (2 Σ p t + 1) / (Σ p + Σ t + 1) on p = sigmoid(logits), smooth 1. The sums run
             over the whole batch like the seed (`loss.dice_per_image = False`), or over each image
             with the per-image losses then averaged (`loss.dice_per_image = True`).

Depth, always on the prediction sigmoid(logits), never the raw logits (the seed's bug):
  depth_l1        mean |ŷ - y|.
  depth_ssim      mean(clip((1 - SSIM_map) / 2, 0, 1)) with `dm_pix.ssim`: a Gaussian window of
                  `loss.ssim_window` taps, σ 1.5, K1 0.01, K2 0.03, max_val 1 and valid filtering,
                  so the map (and the mean) covers only the H - w + 1 by W - w + 1 positions where
                  the whole window fits; images must be at least `ssim_window` on each side.
  depth_edge      mean(|∂y ŷ - ∂y y| + |∂x ŷ - ∂x y|) with forward differences in the
                  `tf.image.image_gradients` convention DenseDepth used: the difference is zero in
                  the last row (∂y) and last column (∂x), and the mean runs over all H·W pixels.
  depth_bce_dice  the seed's mask loss applied to depth as a soft target: BCE from the depth
                  logits (the numerically stable form of BCE on sigmoid(logits)) + Dice on
                  sigmoid(logits), with the same `loss.dice_per_image` choice as the mask.

`compute_losses` returns the weighted total and the unweighted value of each term. A term whose
weight is zero is not computed and is absent from the returned terms (so a zero-weight SSIM costs
nothing); the weights are read at trace time and must be Python numbers, not traced values.

Per-example weights: if the batch has `example_weight` of shape (B,), every term becomes a
weighted mean over examples (pixel means are taken within each image first), and the batch-global
Dice weights each example's sums. Examples of weight 0 (padding) then contribute nothing, not even
NaNs. Without it every example has weight 1 and the terms are the plain means above. If all weights
are zero every term is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import optax

_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03

# Every term's weight is the `loss.*` config key of the same name.
TERM_NAMES = ("mask_bce", "mask_dice", "depth_l1", "depth_ssim", "depth_edge", "depth_bce_dice")


def _example_weight(batch: Mapping[str, Any], batch_size: int) -> jnp.ndarray:
  weight = batch.get("example_weight")
  if weight is None:
    return jnp.ones((batch_size,), jnp.float32)
  return jnp.asarray(weight, jnp.float32).reshape((batch_size,))


def _per_image_mean(values: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def _per_image_sum(values: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def _mask_out(per_example: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Multiplies by the weight, with `where` so a NaN in a padding example cannot leak through."""
  return jnp.where(weight > 0, weight * per_example, 0.0)


def _weighted_mean(per_example: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  total_weight = jnp.sum(jnp.where(weight > 0, weight, 0.0))
  return jnp.sum(_mask_out(per_example, weight)) / jnp.maximum(total_weight, 1e-12)


def bce_loss(logits: jnp.ndarray, labels: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Mean binary cross-entropy between sigmoid(logits) and (possibly soft) labels."""
  per_pixel = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
  return _weighted_mean(_per_image_mean(per_pixel), weight)


def dice_loss(probs: jnp.ndarray, labels: jnp.ndarray, weight: jnp.ndarray,
              per_image: bool, smooth: float = 1.0) -> jnp.ndarray:
  """1 - (2 Σ p t + smooth) / (Σ p + Σ t + smooth), over the batch or averaged per image."""
  intersection = _per_image_sum(probs * labels)
  cardinality = _per_image_sum(probs) + _per_image_sum(labels)
  if per_image:
    per_example = 1.0 - (2.0 * intersection + smooth) / (cardinality + smooth)
    return _weighted_mean(per_example, weight)
  intersection = jnp.sum(_mask_out(intersection, weight))
  cardinality = jnp.sum(_mask_out(cardinality, weight))
  return 1.0 - (2.0 * intersection + smooth) / (cardinality + smooth)


def ssim_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray,
              window: int) -> jnp.ndarray:
  """mean(clip((1 - SSIM) / 2, 0, 1)) over the valid-filtered SSIM map of each image."""
  ssim_map = dm_pix.ssim(
      pred, target, max_val=1.0, filter_size=window, filter_sigma=_SSIM_SIGMA, k1=_SSIM_K1,
      k2=_SSIM_K2, return_map=True)
  dissimilarity = jnp.clip((1.0 - ssim_map) / 2.0, 0.0, 1.0)
  return _weighted_mean(_per_image_mean(dissimilarity), weight)


def image_gradients(images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Forward differences (dy, dx) of NHWC images, zero in the last row / column, shape kept."""
  dy = jnp.pad(images[:, 1:] - images[:, :-1], ((0, 0), (0, 1), (0, 0), (0, 0)))
  dx = jnp.pad(images[:, :, 1:] - images[:, :, :-1], ((0, 0), (0, 0), (0, 1), (0, 0)))
  return dy, dx


def edge_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """mean(|∂y ŷ - ∂y y| + |∂x ŷ - ∂x y|) over all pixels."""
  pred_dy, pred_dx = image_gradients(pred)
  target_dy, target_dx = image_gradients(target)
  per_pixel = jnp.abs(pred_dy - target_dy) + jnp.abs(pred_dx - target_dx)
  return _weighted_mean(_per_image_mean(per_pixel), weight)


def l1_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  return _weighted_mean(_per_image_mean(jnp.abs(pred - target)), weight)


def compute_losses(outputs: Mapping[str, jnp.ndarray], batch: Mapping[str, Any],
                   loss_config: Any) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Returns (total, terms): Σ weight · term, and the unweighted terms with non-zero weight.

  Args:
    outputs: `mask` and `depth` logits, (B, H, W, 1), any float dtype.
    batch: `mask` and `depth` labels in [0, 1], (B, H, W, 1); optionally `example_weight` (B,).
    loss_config: the `loss` section of the config (a ConfigDict or a plain mapping) with the
      weights `mask_bce`, `mask_dice`, `depth_l1`, `depth_ssim`, `depth_edge`, `depth_bce_dice`
      and the options `dice_per_image`, `ssim_window`.
  """
  mask_logits = jnp.asarray(outputs["mask"], jnp.float32)
  depth_logits = jnp.asarray(outputs["depth"], jnp.float32)
  mask_labels = jnp.asarray(batch["mask"], jnp.float32)
  depth_labels = jnp.asarray(batch["depth"], jnp.float32)
  weight = _example_weight(batch, mask_logits.shape[0])
  per_image_dice = bool(loss_config["dice_per_image"])

  # Terms are thunks so that a zero weight skips the computation altogether.
  mask_probs = lambda: jax.nn.sigmoid(mask_logits)
  depth_pred = lambda: jax.nn.sigmoid(depth_logits)
  term_fns = {
      "mask_bce": lambda: bce_loss(mask_logits, mask_labels, weight),
      "mask_dice": lambda: dice_loss(mask_probs(), mask_labels, weight, per_image_dice),
      "depth_l1": lambda: l1_loss(depth_pred(), depth_labels, weight),
      "depth_ssim": lambda: ssim_loss(
          depth_pred(), depth_labels, weight, int(loss_config["ssim_window"])),
      "depth_edge": lambda: edge_loss(depth_pred(), depth_labels, weight),
      "depth_bce_dice": lambda: (
          bce_loss(depth_logits, depth_labels, weight)
          + dice_loss(depth_pred(), depth_labels, weight, per_image_dice)),
  }
  total = jnp.zeros((), jnp.float32)
  terms = {}
  for name in TERM_NAMES:
    term_weight = float(loss_config[name])
    if term_weight == 0.0:
      continue
    terms[name] = term_fns[name]()
    total = total + term_weight * terms[name]
  return total, terms
