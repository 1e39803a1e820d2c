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
                  `loss.ssim_form = "kornia2020"`: the seed's kornia form instead, reflect padding
                  and mean(clip(1 - SSIM_map, 0, 1) / 2) (see `ssim_loss`).
  depth_log_l1    mean |log ŷ - log y|, both clipped below at DEPTH_VALID_MIN: relative errors, as
                  δ thresholds and AbsRel count them, so near pixels (where a centimetre is a large
                  error) weigh more than far ones; log ŷ is log_sigmoid(logits).
  depth_aligned_log_l1  the same after each image's prediction is replaced by s·ŷ + t, the
                  least-squares fit to the truth over pixels of true depth at least
                  DEPTH_VALID_MIN (as the `_aligned` metrics fit it), mean over those pixels:
                  the errors that δ1 aligned counts, which no choice of scale and shift removes.
                  (s, t) are fitted without gradient: through the fit, a nearly constant early
                  prediction divides by a variance near 0.
  depth_edge      mean(|∂y ŷ - ∂y y| + |∂x ŷ - ∂x y|) with forward differences in the
                  `tf.image.image_gradients` convention DenseDepth used: the difference is zero in
                  the last row (∂y) and last column (∂x), and the mean runs over all H·W pixels.
  depth_bce_dice  the seed's mask loss applied to depth as a soft target: BCE from the depth
                  logits (the numerically stable form of BCE on sigmoid(logits)) + Dice on
                  sigmoid(logits), with the same `loss.dice_per_image` choice as the mask.

The other seeds' terms (MODELS.md §1.6, §2.5, §3.3), also on sigmoid(logits) where their code
used raw outputs:
  mask_iou          1 - (Σ p t + 1e-6) / (Σ p + Σ t - Σ p t + 1e-6), p = sigmoid(logits), over the
                    whole batch (seed 004; its code computed it on the raw outputs).
  depth_bce         mean binary cross-entropy from the depth logits (seed 003's regression loss).
  depth_sobel_edge  mean(|Gx ŷ - Gx y| + |Gy ŷ - Gy y|) with kornia's normalised Sobel (the
                    kernels / 8) and replicate padding (seed 004's `SpatialGradient`).
  depth_hu          Hu et al. 2019's depth loss (seed 001's code, §3.3): mean log(|ŷ - y| + 0.5)
                    + mean log(|Sx ŷ - Sx y| + 0.5) + mean log(|Sy ŷ - Sy y| + 0.5)
                    + mean |1 - cos(n_ŷ, n_y)|, unnormalised Sobel S with zero padding,
                    normals n = (-Sx, -Sy, 1).
  side_bce          deep supervision (seed 003): the sum over the six side outputs of both tasks
                    of their mean BCE from logits; needs a model with `mask_sides` and
                    `depth_sides` outputs (u2netp_dual). With mask_bce = depth_bce = side_bce = 1
                    this is the seed's 14-term loss.

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

from dmjax import errors, reductions
from dmjax.config import SSIM_FORMS
from dmjax.data import schema
from dmjax.models import refiner

_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03

# Every term's weight is the `loss.*` config key of the same name.
TERM_NAMES = ("mask_bce", "mask_dice", "depth_l1", "depth_log_l1", "depth_aligned_log_l1",
              "depth_ssim", "depth_edge", "depth_bce_dice", "mask_iou", "depth_bce",
              "depth_sobel_edge", "depth_hu", "side_bce")
# Outputs of a model with deep supervision (u2netp_dual): (B, H, W, number of side outputs).
SIDE_OUTPUTS = ("mask_sides", "depth_sides")
_IOU_SMOOTH = 1e-6  # Seed 004's.
_HU_OFFSET = 0.5  # log(|difference| + 0.5), Hu et al.'s.


def _example_weight(batch: Mapping[str, Any], batch_size: int) -> jnp.ndarray:
  weight = batch.get("example_weight")
  if weight is None:
    return jnp.ones((batch_size,), jnp.float32)
  return jnp.asarray(weight, jnp.float32).reshape((batch_size,))


def bce_loss(logits: jnp.ndarray, labels: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Mean binary cross-entropy between sigmoid(logits) and (possibly soft) labels."""
  per_pixel = optax.losses.sigmoid_binary_cross_entropy(logits, labels)
  return reductions.weighted_mean(reductions.per_image_mean(per_pixel), weight)


def dice_loss(probs: jnp.ndarray, labels: jnp.ndarray, weight: jnp.ndarray,
              per_image: bool, smooth: float = 1.0) -> jnp.ndarray:
  """1 - (2 Σ p t + smooth) / (Σ p + Σ t + smooth), over the batch or averaged per image."""
  intersection = reductions.per_image_sum(probs * labels)
  cardinality = reductions.per_image_sum(probs) + reductions.per_image_sum(labels)
  if per_image:
    per_example = 1.0 - (2.0 * intersection + smooth) / (cardinality + smooth)
    return reductions.weighted_mean(per_example, weight)
  intersection = reductions.weighted_sum(intersection, weight)
  cardinality = reductions.weighted_sum(cardinality, weight)
  return 1.0 - (2.0 * intersection + smooth) / (cardinality + smooth)


def ssim_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray, window: int,
              form: str = "reference") -> jnp.ndarray:
  """The SSIM loss of each image, averaged; `form` (`loss.ssim_form`) says which:

  "reference"   mean(clip((1 - SSIM) / 2, 0, 1)) over the valid-filtered SSIM map.
  "kornia2020"  mean(clip(1 - SSIM, 0, 1) / 2) over the SSIM map of the images reflect-padded by
                window // 2 (numpy's "reflect": the edge pixel not repeated), so one value per
                pixel: `kornia.losses.SSIM(window)` of kornia 0.2-0.4, the seed's (SPEC §3).
  """
  if form not in SSIM_FORMS:
    raise errors.UserError(f"config.loss.ssim_form={form!r}: expected one of {SSIM_FORMS}")
  if form == "kornia2020":
    pad = ((0, 0), (window // 2, window // 2), (window // 2, window // 2), (0, 0))
    pred, target = jnp.pad(pred, pad, mode="reflect"), jnp.pad(target, pad, mode="reflect")
  ssim_map = dm_pix.ssim(
      pred, target, max_val=1.0, filter_size=window, filter_sigma=_SSIM_SIGMA, k1=_SSIM_K1,
      k2=_SSIM_K2, return_map=True)
  if form == "kornia2020":
    dissimilarity = jnp.clip(1.0 - ssim_map, 0.0, 1.0) / 2.0
  else:
    dissimilarity = jnp.clip((1.0 - ssim_map) / 2.0, 0.0, 1.0)
  return reductions.weighted_mean(reductions.per_image_mean(dissimilarity), weight)


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
  return reductions.weighted_mean(reductions.per_image_mean(per_pixel), weight)


def l1_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  return reductions.weighted_mean(reductions.per_image_mean(jnp.abs(pred - target)), weight)


def log_l1_loss(logits: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  floor = jnp.log(schema.DEPTH_VALID_MIN)
  log_pred = jnp.maximum(jax.nn.log_sigmoid(logits), floor)
  log_target = jnp.log(jnp.maximum(target, schema.DEPTH_VALID_MIN))
  return reductions.weighted_mean(reductions.per_image_mean(jnp.abs(log_pred - log_target)),
                                  weight)


def aligned_log_l1_loss(pred: jnp.ndarray, target: jnp.ndarray,
                        weight: jnp.ndarray) -> jnp.ndarray:
  valid = target >= schema.DEPTH_VALID_MIN
  scale, shift = jax.lax.stop_gradient(reductions.fit_scale_and_shift(pred, target, valid))
  aligned = jnp.maximum(scale * pred + shift, schema.DEPTH_VALID_MIN)
  per_pixel = jnp.where(valid, jnp.abs(jnp.log(aligned) - jnp.log(jnp.where(valid, target, 1.0))),
                        0.0)
  count = jnp.maximum(reductions.per_image_sum(valid.astype(jnp.float32)), 1.0)
  return reductions.weighted_mean(reductions.per_image_sum(per_pixel) / count, weight)


def iou_loss(probs: jnp.ndarray, labels: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """1 - (Σ p t + smooth) / (Σ p + Σ t - Σ p t + smooth), sums over the whole batch."""
  intersection = reductions.weighted_sum(reductions.per_image_sum(probs * labels), weight)
  total = reductions.weighted_sum(reductions.per_image_sum(probs + labels), weight)
  return 1.0 - (intersection + _IOU_SMOOTH) / (total - intersection + _IOU_SMOOTH)


_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel(images: jnp.ndarray, padding: str, normalized: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(Gx, Gy): cross-correlation of NHWC one-channel images with [[-1,0,1],[-2,0,2],[-1,0,1]]
  and its transpose, `padding` "edge" (replicate) or "constant" (zeros), / 8 if normalized."""
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=padding)
  height, width = images.shape[1:3]
  scale = 1.0 / 8.0 if normalized else 1.0
  gx = gy = jnp.zeros_like(images)
  for i in range(3):
    for j in range(3):
      window = padded[:, i:i + height, j:j + width]
      gx = gx + (scale * _SOBEL_X[i][j]) * window
      gy = gy + (scale * _SOBEL_X[j][i]) * window
  return gx, gy


def sobel_edge_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """mean(|Gx ŷ - Gx y| + |Gy ŷ - Gy y|), kornia's normalised Sobel with replicate padding."""
  pred_gx, pred_gy = sobel(pred, "edge", normalized=True)
  target_gx, target_gy = sobel(target, "edge", normalized=True)
  per_pixel = jnp.abs(pred_gx - target_gx) + jnp.abs(pred_gy - target_gy)
  return reductions.weighted_mean(reductions.per_image_mean(per_pixel), weight)


def hu_depth_loss(pred: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Hu et al. 2019: depth, gradient and surface-normal terms, unnormalised zero-padded Sobel."""
  pred_gx, pred_gy = sobel(pred, "constant", normalized=False)
  target_gx, target_gy = sobel(target, "constant", normalized=False)
  log_error = lambda a, b: jnp.log(jnp.abs(a - b) + _HU_OFFSET)
  # n = (-Gx, -Gy, 1); |n| >= 1, so the cosine needs no epsilon.
  dot = pred_gx * target_gx + pred_gy * target_gy + 1.0
  norms = jnp.sqrt((pred_gx**2 + pred_gy**2 + 1.0) * (target_gx**2 + target_gy**2 + 1.0))
  per_example = (reductions.per_image_mean(log_error(pred, target))
                 + reductions.per_image_mean(log_error(pred_gx, target_gx))
                 + reductions.per_image_mean(log_error(pred_gy, target_gy))
                 + reductions.per_image_mean(jnp.abs(1.0 - dot / norms)))
  return reductions.weighted_mean(per_example, weight)


def side_bce_loss(outputs: Mapping[str, jnp.ndarray], batch: Mapping[str, Any],
                  weight: jnp.ndarray) -> jnp.ndarray:
  """Σ over side outputs of both tasks of their mean BCE against that task's labels."""
  missing = [key for key in SIDE_OUTPUTS if key not in outputs]
  if missing:
    raise errors.UserError(f"loss.side_bce > 0 needs a model with side outputs {missing} "
                           "(u2netp_dual); set loss.side_bce=0 for this model")
  total = jnp.zeros((), jnp.float32)
  for key in SIDE_OUTPUTS:
    sides = jnp.asarray(outputs[key], jnp.float32)
    labels = jnp.asarray(batch[key.removesuffix("_sides")], jnp.float32)
    for k in range(sides.shape[-1]):
      total = total + bce_loss(sides[..., k:k + 1], labels, weight)
  return total


def compute_losses(outputs: Mapping[str, jnp.ndarray], batch: Mapping[str, Any],
                   loss_config: Any) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Returns (total, terms): Σ weight · term, and the unweighted terms with non-zero weight.

  Args:
    outputs: `mask` and `depth` logits, (B, H, W, 1), any float dtype; `mask_sides` and
      `depth_sides` (B, H, W, S) if the model has side outputs (read by `side_bce` alone).
    batch: `mask` and `depth` labels in [0, 1], (B, H, W, 1); optionally `example_weight` (B,).
    loss_config: the `loss` section of the config (a ConfigDict or a plain mapping) with the
      weights `mask_bce`, `mask_dice`, `depth_l1`, `depth_ssim`, `depth_edge`, `depth_bce_dice`
      and the options `dice_per_image`, `ssim_window`.
  """
  mask_logits = jnp.asarray(outputs["mask"], jnp.float32)
  depth_logits = jnp.asarray(outputs["depth"], jnp.float32)
  mask_labels = jnp.asarray(batch["mask"], jnp.float32)
  depth_labels = jnp.asarray(batch["depth"], jnp.float32)
  if "window" in outputs:  # The outputs cover a square window of each example.
    crop = lambda labels: refiner.crop_windows(labels, outputs["window"], mask_logits.shape[1])
    mask_labels, depth_labels = crop(mask_labels), crop(depth_labels)
  weight = _example_weight(batch, mask_logits.shape[0])
  per_image_dice = bool(loss_config["dice_per_image"])

  # Terms are thunks so that a zero weight skips the computation altogether.
  mask_probs = lambda: jax.nn.sigmoid(mask_logits)
  depth_pred = lambda: jax.nn.sigmoid(depth_logits)
  term_fns = {
      "mask_bce": lambda: bce_loss(mask_logits, mask_labels, weight),
      "mask_dice": lambda: dice_loss(mask_probs(), mask_labels, weight, per_image_dice),
      "depth_l1": lambda: l1_loss(depth_pred(), depth_labels, weight),
      "depth_log_l1": lambda: log_l1_loss(depth_logits, depth_labels, weight),
      "depth_aligned_log_l1": lambda: aligned_log_l1_loss(depth_pred(), depth_labels, weight),
      "depth_ssim": lambda: ssim_loss(
          depth_pred(), depth_labels, weight, int(loss_config["ssim_window"]),
          str(loss_config.get("ssim_form", "reference"))),
      "depth_edge": lambda: edge_loss(depth_pred(), depth_labels, weight),
      "depth_bce_dice": lambda: (
          bce_loss(depth_logits, depth_labels, weight)
          + dice_loss(depth_pred(), depth_labels, weight, per_image_dice)),
      "mask_iou": lambda: iou_loss(mask_probs(), mask_labels, weight),
      "depth_bce": lambda: bce_loss(depth_logits, depth_labels, weight),
      "depth_sobel_edge": lambda: sobel_edge_loss(depth_pred(), depth_labels, weight),
      "depth_hu": lambda: hu_depth_loss(depth_pred(), depth_labels, weight),
      "side_bce": lambda: side_bce_loss(outputs, batch, weight),
  }
  total = jnp.zeros((), jnp.float32)
  terms = {}
  for name in TERM_NAMES:
    term_weight = float(loss_config.get(name, 0.0))
    if term_weight == 0.0:
      continue
    terms[name] = term_fns[name]()
    total = total + term_weight * terms[name]
  coarse_weight = float(loss_config.get("coarse", 0.0))
  if "coarse" in outputs and coarse_weight:
    # A refined model's base network (dmjax.models.refiner), against labels at its own size.
    coarse = outputs["coarse"]
    height, width = coarse["mask"].shape[1:3]
    # Antialiased: each coarse label is the mean over the pixels it covers.
    labels = {k: refiner.resize(jnp.asarray(batch[k], jnp.float32), height, width)
              for k in ("mask", "depth")}
    if "example_weight" in batch:
      labels["example_weight"] = batch["example_weight"]
    terms["coarse"], _ = compute_losses(coarse, labels, dict(loss_config, coarse=0.0))
    total = total + coarse_weight * terms["coarse"]
  return total, terms
