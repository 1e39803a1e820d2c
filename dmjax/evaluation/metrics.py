"""Held-out mask and depth metrics as one mergeable `clu.metrics.Collection`.

`compute_metrics(mask_prob, depth_pred, batch)` runs on device (inside jit, on globally sharded
arrays) and returns an `EvalMetrics`; `.merge` accumulates batches and `.compute()` gives a flat
dict of scalars. Every metric is stored as a pair of sums (numerator, denominator), so merging is
addition and the merged result equals the metric of the concatenated batches exactly (up to float32
summation order). The sums are float32: over a test set of millions of pixels and a few thousand
merges their relative error stays within about 1e-5, far below anything these metrics are read for.
Before any data (the empty collection) means compute to NaN, Dice/IoU and checkerboard to 1.

Predictions and labels are (B, H, W, 1) in [0, 1]. `batch["example_weight"]` (B,), if present,
weights each example's contribution to every sum; padding examples have weight 0 and count
nowhere (their values are masked with `where`, so even NaNs in them cannot leak in).

Mask, with prediction and label both binarised as `value > 0.5`:
  mask_dice, mask_iou   dataset-global, from TP, FP, FN summed over all pixels of all images:
                        2TP / (2TP + FP + FN) and TP / (TP + FP + FN); 1 if the denominator is 0
                        (nothing predicted and nothing there, in the whole dataset).
  mask_dice_per_image,  the same per image, then averaged over images; an image with an empty
  mask_iou_per_image    label and an empty prediction scores 1 (a correct "no object" answer),
                        an empty label with any predicted pixel scores 0.
  mask_mae              mean |p - t| over all pixels, probabilities against the soft label.
  (mask_boundary_f, the boundary F-score, is per image and host-side: `boundary_f_score`; the
  evaluate tool reports its mean over images.)

Depth, over valid pixels only: those whose true depth is at least `schema.DEPTH_VALID_MIN` (the seed
data's per-image rescale puts each image's nearest pixel at exactly 0, where ratios are undefined).
Pixel means are dataset-global (every valid pixel of the dataset weighs the same), and so are the
means under the square roots: RMSE = sqrt(Σ err² / N) over all valid pixels of the dataset, not a
mean of per-image RMSEs.
  depth_mae, depth_rmse       on the prediction as given.
  depth_abs_rel  mean |d - d*| / d*        depth_sq_rel    mean (d - d*)² / d*
  depth_rmse_log sqrt(mean (ln d - ln d*)²) depth_log10    mean |log10 d - log10 d*|
  depth_delta{1,2,3}  fraction of pixels with max(d / d*, d* / d) < 1.25^k
The ratio and log metrics (abs_rel to delta3) use the prediction clipped to [DEPTH_VALID_MIN, 1].

Every depth metric again with the suffix `_aligned`: before measuring, each image's prediction is
replaced by s·d + t with (s, t) the least-squares fit of the prediction to the truth over that
image's valid pixels (the MiDaS scale-and-shift protocol, here in depth space because both the
seed labels and our predictions are affinely normalised depth, not disparity). The closed form of
the 2×2 normal equations is used in centred form: s = cov(d, d*) / var(d), t = mean(d*) - s·mean(d).
An image whose prediction is (nearly) constant over its valid pixels (Σ (d - mean d)² ≤ 1e-12 · N,
including images with fewer than two valid pixels) has no unique fit; it gets s = 0, t = mean(d*),
which is the fitted value of every least-squares solution in the exactly constant case (the fit is
`dmjax.reductions.fit_scale_and_shift`, which the `depth_aligned_log_l1` loss shares). The aligned
prediction is clipped for the ratio and log metrics exactly like the raw one.

checkerboard: how much period-2 grid energy the predicted depth has, relative to the truth. An
image x (all pixels, valid or not; H and W even) is first multiplied by the separable window
w(row, col) = h_H(row) · h_W(col), h_N(n) = sin²(π (n + ½) / N) (a Hann window, half-sample
centred), because the bare image's periodic extension jumps at the borders and that jump leaks into
the Nyquist bins: unwindowed, a plain 0→1 ramp across 64 pixels reads as a ±0.008 grid pattern;
windowed, as ±0.00001. Its Nyquist amplitudes are then the projections
  a_x  = Σ w·x·(-1)^col / Σ w,   a_y = Σ w·x·(-1)^row / Σ w,   a_xy = Σ w·x·(-1)^(row+col) / Σ w,
i.e. the (0, π), (π, 0) and (π, π) DFT bins of w·x divided by Σ w, so that a uniform ±a grid
pattern has amplitude a; its Nyquist energy is E(x) = a_x² + a_y² + a_xy². The metric is
(Σ_images E(pred) + ε) / (Σ_images E(true) + ε) with ε = 1e-10 (the sums weighted like everything
else): about 1 when the prediction has as much exact-period-2 energy as the truth (exactly 1 when
pred = truth), ≫ 1 for a checkerboarded prediction. Only period 2 is measured, and only the part
of the pattern that keeps one phase across the image: a grid whose sign flips from region to
region partly cancels.

Under shard_map (or pmap) pass `axis_name`: all fields are sums, so a `psum` of them makes the
collection global; under plain jit over sharded arrays it is global already.
"""

# No `from __future__ import annotations`: clu's Collection reads the metric classes from
# `__annotations__`, which would then hold strings.

import math

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from flax import struct

from dmjax.data.schema import DEPTH_VALID_MIN, MASK_THRESHOLD
from dmjax.reductions import align_scale_and_shift, per_image_sum, weighted_sum

DELTA_BASE = 1.25
CHECKERBOARD_EPS = 1e-10


@struct.dataclass
class SumRatio(clu_metrics.Metric):
  """numerator / denominator, both summed over batches; NaN while the denominator is 0."""

  numerator: jnp.ndarray
  denominator: jnp.ndarray

  @classmethod
  def empty(cls):
    return cls(numerator=jnp.zeros((), jnp.float32), denominator=jnp.zeros((), jnp.float32))

  @classmethod
  def from_sums(cls, numerator, denominator):
    return cls(numerator=jnp.asarray(numerator, jnp.float32),
               denominator=jnp.asarray(denominator, jnp.float32))

  @classmethod
  def from_model_output(cls, *args, **kwargs):
    raise NotImplementedError("built from sums by compute_metrics")

  def merge(self, other):
    return type(self)(numerator=self.numerator + other.numerator,
                      denominator=self.denominator + other.denominator)

  def _ratio(self, value_if_empty):
    has_data = self.denominator > 0
    return jnp.where(has_data, self.numerator / jnp.where(has_data, self.denominator, 1.0),
                     value_if_empty)

  def compute(self):
    return self._ratio(jnp.nan)


@struct.dataclass
class RootSumRatio(SumRatio):
  """sqrt(numerator / denominator): a root mean square."""

  def compute(self):
    return jnp.sqrt(self._ratio(jnp.nan))


@struct.dataclass
class Overlap(SumRatio):
  """Dice or IoU from summed counts; 1 when there was nothing to predict and nothing predicted."""

  def compute(self):
    return self._ratio(1.0)


@struct.dataclass
class EnergyRatio(SumRatio):
  """(numerator + ε) / (denominator + ε): exactly 1 for equal energies, even both zero."""

  def compute(self):
    return (self.numerator + CHECKERBOARD_EPS) / (self.denominator + CHECKERBOARD_EPS)


@struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  mask_dice: Overlap
  mask_iou: Overlap
  mask_dice_per_image: SumRatio
  mask_iou_per_image: SumRatio
  mask_mae: SumRatio
  depth_mae: SumRatio
  depth_rmse: RootSumRatio
  depth_abs_rel: SumRatio
  depth_sq_rel: SumRatio
  depth_rmse_log: RootSumRatio
  depth_log10: SumRatio
  depth_delta1: SumRatio
  depth_delta2: SumRatio
  depth_delta3: SumRatio
  depth_mae_aligned: SumRatio
  depth_rmse_aligned: RootSumRatio
  depth_abs_rel_aligned: SumRatio
  depth_sq_rel_aligned: SumRatio
  depth_rmse_log_aligned: RootSumRatio
  depth_log10_aligned: SumRatio
  depth_delta1_aligned: SumRatio
  depth_delta2_aligned: SumRatio
  depth_delta3_aligned: SumRatio
  checkerboard: EnergyRatio


def _mask_sums(mask_prob, mask_true, weight):
  predicted = mask_prob > MASK_THRESHOLD
  actual = mask_true > MASK_THRESHOLD
  true_positives = per_image_sum((predicted & actual).astype(jnp.float32))
  false_positives = per_image_sum((predicted & ~actual).astype(jnp.float32))
  false_negatives = per_image_sum((~predicted & actual).astype(jnp.float32))

  dice_denominator = 2 * true_positives + false_positives + false_negatives
  iou_denominator = true_positives + false_positives + false_negatives
  # Empty label and empty prediction: both denominators are 0 and the image scores 1.
  dice_per_image = jnp.where(dice_denominator > 0,
                             2 * true_positives / jnp.maximum(dice_denominator, 1.0), 1.0)
  iou_per_image = jnp.where(iou_denominator > 0,
                            true_positives / jnp.maximum(iou_denominator, 1.0), 1.0)

  num_pixels = mask_prob[0].size
  num_images = weighted_sum(jnp.ones_like(weight), weight)
  return {
      "mask_dice": (weighted_sum(2 * true_positives, weight),
                    weighted_sum(dice_denominator, weight)),
      "mask_iou": (weighted_sum(true_positives, weight), weighted_sum(iou_denominator, weight)),
      "mask_dice_per_image": (weighted_sum(dice_per_image, weight), num_images),
      "mask_iou_per_image": (weighted_sum(iou_per_image, weight), num_images),
      "mask_mae": (weighted_sum(per_image_sum(jnp.abs(mask_prob - mask_true)), weight),
                   num_images * num_pixels),
  }


def _depth_sums(depth_pred, depth_true, valid, weight, suffix):
  """(numerator, denominator) of every depth metric, over valid pixels of weighted examples."""
  valid = valid.astype(jnp.float32)
  # Invalid pixels get a harmless truth of 1 so ratios and logs stay finite before masking.
  safe_true = jnp.where(valid > 0, depth_true, 1.0)
  clipped = jnp.clip(depth_pred, DEPTH_VALID_MIN, 1.0)
  error = depth_pred - depth_true
  clipped_error = clipped - safe_true
  log_error = jnp.log(clipped) - jnp.log(safe_true)
  worst_ratio = jnp.maximum(clipped / safe_true, safe_true / clipped)

  def valid_sum(per_pixel):
    return weighted_sum(per_image_sum(jnp.where(valid > 0, per_pixel, 0.0)), weight)

  num_valid = valid_sum(jnp.ones_like(depth_pred))
  per_pixel_terms = {
      "depth_mae": jnp.abs(error),
      "depth_rmse": error**2,
      "depth_abs_rel": jnp.abs(clipped_error) / safe_true,
      "depth_sq_rel": clipped_error**2 / safe_true,
      "depth_rmse_log": log_error**2,
      "depth_log10": jnp.abs(log_error) / jnp.log(10.0),
  }
  for k in (1, 2, 3):
    per_pixel_terms[f"depth_delta{k}"] = (worst_ratio < DELTA_BASE**k).astype(jnp.float32)
  return {name + suffix: (valid_sum(term), num_valid) for name, term in per_pixel_terms.items()}


def _hann_window(length):
  return jnp.sin(jnp.pi * (jnp.arange(length) + 0.5) / length) ** 2


def nyquist_energy(images):
  """Per image, a_x² + a_y² + a_xy²: Hann-windowed projections onto the period-2 patterns."""
  height, width = images.shape[1:3]
  window = _hann_window(height)[:, None, None] * _hann_window(width)[None, :, None]
  row_sign = jnp.where(jnp.arange(height) % 2 == 0, 1.0, -1.0)[:, None, None]
  col_sign = jnp.where(jnp.arange(width) % 2 == 0, 1.0, -1.0)[None, :, None]
  windowed = images * (window / jnp.sum(window))
  amplitude_x = per_image_sum(windowed * col_sign)
  amplitude_y = per_image_sum(windowed * row_sign)
  amplitude_xy = per_image_sum(windowed * (row_sign * col_sign))
  return amplitude_x**2 + amplitude_y**2 + amplitude_xy**2


def compute_metrics(mask_prob, depth_pred, batch, axis_name=None) -> EvalMetrics:
  """The metric collection of one batch.

  Args:
    mask_prob: predicted mask probabilities in [0, 1], (B, H, W, 1).
    depth_pred: predicted depth in [0, 1], (B, H, W, 1).
    batch: `mask` and `depth` labels (B, H, W, 1), optionally `example_weight` (B,).
    axis_name: the mapped axis to sum the statistics over under shard_map or pmap; None under
      jit, where reductions over sharded arrays are already global.
  """
  mask_prob = jnp.asarray(mask_prob, jnp.float32)
  depth_pred = jnp.asarray(depth_pred, jnp.float32)
  mask_true = jnp.asarray(batch["mask"], jnp.float32)
  depth_true = jnp.asarray(batch["depth"], jnp.float32)
  batch_size = mask_prob.shape[0]
  weight = batch.get("example_weight")
  weight = (jnp.ones((batch_size,), jnp.float32) if weight is None
            else jnp.asarray(weight, jnp.float32).reshape((batch_size,)))

  valid = depth_true >= DEPTH_VALID_MIN
  aligned = align_scale_and_shift(depth_pred, depth_true, valid)
  sums = _mask_sums(mask_prob, mask_true, weight)
  sums.update(_depth_sums(depth_pred, depth_true, valid, weight, suffix=""))
  sums.update(_depth_sums(aligned, depth_true, valid, weight, suffix="_aligned"))
  sums["checkerboard"] = (weighted_sum(nyquist_energy(depth_pred), weight),
                          weighted_sum(nyquist_energy(depth_true), weight))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)

  metric_types = EvalMetrics.__annotations__
  return EvalMetrics.empty().replace(**{
      name: metric_types[name].from_sums(numerator, denominator)
      for name, (numerator, denominator) in sums.items()
  })


# Boundary F-score: host-side numpy, because it is per image and needs a neighbourhood search;
# evaluation computes it on the predictions it has fetched anyway.

BOUNDARY_TOLERANCE = 0.008  # Of the image diagonal (SPEC §3).


def mask_boundary(masks):
  """Boolean (..., H, W): object pixels with a 4-neighbour outside the object.

  Outside the image counts as more of the same pixel, so where an object is cut off by the frame
  the cut is not an edge of it.
  """
  masks = np.asarray(masks, bool)
  pad = [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)]
  padded = np.pad(masks, pad, mode="edge")
  interior = (padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1] & padded[..., 1:-1, :-2]
              & padded[..., 1:-1, 2:])
  return masks & ~interior


def boundary_tolerance(height: int, width: int, fraction: float = BOUNDARY_TOLERANCE) -> int:
  """The match distance in pixels: `fraction` of the diagonal, rounded up as DAVIS does."""
  return max(1, math.ceil(fraction * math.hypot(height, width)))


def _within(points, radius: int):
  """Pixels within Euclidean distance `radius` of any True pixel of (..., H, W) `points`."""
  near = np.zeros_like(points)
  height, width = points.shape[-2:]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      if dy * dy + dx * dx > radius * radius:
        continue
      # near[y, x] |= points[y + dy, x + dx] where that pixel exists.
      near[..., max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] |= (
          points[..., max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)])
  return near


def boundary_f_score(mask_prob, mask_true, fraction: float = BOUNDARY_TOLERANCE) -> np.ndarray:
  """Per-image F-measure of the predicted against the true mask boundary (DAVIS's F).

  Both masks are binarised at 0.5 and their boundaries taken with `mask_boundary`. Precision is
  the fraction of predicted boundary pixels within `boundary_tolerance` of a true one, recall the
  converse, F = 2PR / (P + R). An image with neither boundary scores 1, with only one of them 0.

  Args:
    mask_prob, mask_true: (B, H, W, 1) or (B, H, W) in [0, 1].
  Returns:
    float64 (B,).
  """
  def boundaries(masks):
    masks = np.asarray(masks)
    masks = masks[..., 0] if masks.ndim == 4 else masks
    return mask_boundary(masks > MASK_THRESHOLD)

  predicted, actual = boundaries(mask_prob), boundaries(mask_true)
  radius = boundary_tolerance(*predicted.shape[-2:], fraction=fraction)
  num_predicted = predicted.sum(axis=(-2, -1))
  num_actual = actual.sum(axis=(-2, -1))
  precision = _safe_ratio((predicted & _within(actual, radius)).sum(axis=(-2, -1)),
                          num_predicted, if_empty=1.0)
  recall = _safe_ratio((actual & _within(predicted, radius)).sum(axis=(-2, -1)), num_actual,
                       if_empty=1.0)
  f_score = _safe_ratio(2 * precision * recall, precision + recall, if_empty=0.0)
  # Only one boundary present: P or R is 1 by the empty convention, the other 0, so F = 0.
  return np.where((num_predicted == 0) & (num_actual == 0), 1.0, f_score)


def _safe_ratio(numerator, denominator, if_empty):
  numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0),
                  if_empty)


# What a run's log and the evaluate tool show first.
KEY_METRICS = ("mask_iou", "mask_dice", "depth_rmse", "depth_rmse_aligned", "depth_abs_rel",
               "depth_delta1", "checkerboard")


def format_table(results: dict[str, float], keys=KEY_METRICS) -> str:
  """The `keys` of `results` beside their `baseline_` values, one per line."""
  lines = [f"{'metric':<22}{'model':>10}{'baseline':>10}"]
  for key in keys:
    if key in results:
      baseline = results.get("baseline_" + key)
      shown = f"{baseline:>10.4f}" if baseline is not None else f"{'':>10}"
      lines.append(f"{key:<22}{results[key]:>10.4f}{shown}")
  return "\n".join(lines)
