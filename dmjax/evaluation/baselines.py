"""Trivial baselines that a learned model has to beat, fitted in one pass over numpy batches:
the |fg_bg − bg| threshold (`DifferenceMaskBaseline`) and the mean depth map (`MeanDepthBaseline`),
and their evaluation beside a model's (`evaluate_baselines`).

Inputs are float arrays in [0, 1] of shape (B, H, W, C), as in `dmjax.data.schema` but before
normalisation. Both baselines serialise to plain JSON-able dicts so they can be stored beside a
run and reloaded without refitting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dmjax import parallel
from dmjax.data import pipeline
from dmjax.evaluation import evaluator
from dmjax.evaluation import metrics as metrics_lib

DEFAULT_NUM_THRESHOLDS = 64


def _as_batch(array: Any, name: str) -> np.ndarray:
  array = np.asarray(array, dtype=np.float32)
  if array.ndim != 4:
    raise ValueError(f"{name}: expected shape (B, H, W, C), got {array.shape}")
  return array


def difference_image(bg: Any, fg_bg: Any) -> np.ndarray:
  """Max over channels of |fg_bg - bg|, shape (B, H, W, 1).

  The maximum rather than the mean keeps objects that differ from the background in one colour
  channel only (say, a red object on a grey wall of the same brightness).
  """
  bg = _as_batch(bg, "bg")
  fg_bg = _as_batch(fg_bg, "fg_bg")
  if bg.shape != fg_bg.shape:
    raise ValueError(f"bg {bg.shape} and fg_bg {fg_bg.shape} differ in shape")
  return np.abs(fg_bg - bg).max(axis=-1, keepdims=True)


class DifferenceMaskBaseline:
  """Predicts the object where max-channel |fg_bg - bg| exceeds a threshold fitted for IoU.

  `fit` picks, among `num_thresholds` evenly spaced thresholds (k + 0.5) / num_thresholds, the
  one with the highest dataset-global IoU (intersection and union summed over all pixels of all
  examples) against the mask label thresholded at 0.5. Counting differences into one histogram per
  label class makes every threshold's IoU available after a single pass.
  """

  def __init__(self, threshold: float | None = None,
               num_thresholds: int = DEFAULT_NUM_THRESHOLDS):
    self.threshold = None if threshold is None else float(threshold)
    self.num_thresholds = int(num_thresholds)
    self.train_iou: float | None = None

  @property
  def thresholds(self) -> np.ndarray:
    return (np.arange(self.num_thresholds) + 0.5) / self.num_thresholds

  def fit(self, pairs: Iterable[tuple[Any, Any, Any]]) -> DifferenceMaskBaseline:
    """Fits the threshold on (bg, fg_bg, mask) batches; returns self."""
    thresholds = self.thresholds
    # counts[c, j]: pixels of label class c whose difference exceeds exactly j thresholds.
    counts = np.zeros((2, len(thresholds) + 1), np.int64)
    for bg, fg_bg, mask in pairs:
      difference = difference_image(bg, fg_bg)
      target = _as_batch(mask, "mask") >= 0.5
      if target.shape != difference.shape:
        raise ValueError(f"mask {target.shape} does not match images {difference.shape}")
      num_exceeded = np.searchsorted(thresholds, difference.ravel(), side="left")
      target = target.ravel()
      counts[0] += np.bincount(num_exceeded[~target], minlength=counts.shape[1])
      counts[1] += np.bincount(num_exceeded[target], minlength=counts.shape[1])
    if not counts.any():
      raise ValueError("DifferenceMaskBaseline.fit got no pixels")
    # Threshold k predicts "object" for pixels that exceed more than k thresholds.
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    true_positive = above[1]
    false_positive = above[0]
    false_negative = counts[1].sum() - true_positive
    union = true_positive + false_positive + false_negative
    iou = np.where(union > 0, true_positive / np.maximum(union, 1), 0.0)
    best = int(np.argmax(iou))
    self.threshold = float(thresholds[best])
    self.train_iou = float(iou[best])
    return self

  def predict(self, bg: Any, fg_bg: Any) -> np.ndarray:
    """(B, H, W, 1) float32 in {0, 1}."""
    if self.threshold is None:
      raise ValueError("DifferenceMaskBaseline.predict called before fit")
    return (difference_image(bg, fg_bg) > self.threshold).astype(np.float32)

  def to_dict(self) -> dict[str, Any]:
    return {
        "type": "difference_mask",
        "channel_reduction": "max",
        "threshold": self.threshold,
        "num_thresholds": self.num_thresholds,
        "train_iou": self.train_iou,
    }

  @classmethod
  def from_dict(cls, state: dict[str, Any]) -> DifferenceMaskBaseline:
    if state.get("type") != "difference_mask":
      raise ValueError(f"not a DifferenceMaskBaseline state: type={state.get('type')!r}")
    baseline = cls(state["threshold"], state.get("num_thresholds", DEFAULT_NUM_THRESHOLDS))
    baseline.train_iou = state.get("train_iou")
    return baseline


class MeanDepthBaseline:
  """Predicts the per-pixel mean training depth map for every image."""

  def __init__(self, mean: Any = None):
    self.mean = None if mean is None else np.asarray(mean, np.float32)

  def fit(self, depth_batches: Iterable[Any]) -> MeanDepthBaseline:
    """Fits on (B, H, W, 1) depth batches in [0, 1]; returns self."""
    total = None
    count = 0
    for depth in depth_batches:
      depth = _as_batch(depth, "depth")
      if total is None:
        total = np.zeros(depth.shape[1:], np.float64)
      elif depth.shape[1:] != total.shape:
        raise ValueError(f"depth batch of shape {depth.shape} after {total.shape} batches")
      total += depth.sum(axis=0, dtype=np.float64)
      count += depth.shape[0]
    if not count:
      raise ValueError("MeanDepthBaseline.fit got no examples")
    self.mean = (total / count).astype(np.float32)
    return self

  def predict(self, batch_size: int) -> np.ndarray:
    """(batch_size, H, W, 1) float32."""
    if self.mean is None:
      raise ValueError("MeanDepthBaseline.predict called before fit")
    return np.repeat(self.mean[None], batch_size, axis=0)

  def to_dict(self) -> dict[str, Any]:
    return {
        "type": "mean_depth",
        "mean": None if self.mean is None else self.mean.tolist(),
    }

  @classmethod
  def from_dict(cls, state: dict[str, Any]) -> MeanDepthBaseline:
    if state.get("type") != "mean_depth":
      raise ValueError(f"not a MeanDepthBaseline state: type={state.get('type')!r}")
    return cls(state["mean"])


# ---- Fitted on a run's training data and evaluated like a model.


def fit_baselines(config, num_examples: int = 512):
  """Fits the |fg_bg − bg| threshold and the mean depth map on (unaugmented) training data.

  Every process reads the same examples, so all of them fit the same baselines.
  """
  batches = pipeline.create_eval_batches(config, "train", num_examples, process_index=0,
                                         process_count=1)
  batches = [_unpadded(b) for b in batches]
  mask_baseline = DifferenceMaskBaseline()
  mask_baseline.fit([(*pipeline.denormalize(b), b["mask"]) for b in batches])
  depth_baseline = MeanDepthBaseline()
  depth_baseline.fit([b["depth"] for b in batches])
  return mask_baseline, depth_baseline


def _unpadded(batch: dict) -> dict:
  keep = batch["example_weight"] > 0
  return {k: v[keep] for k, v in batch.items()}


def with_baseline_predictions(batches: Iterable[dict], mask_baseline,
                              depth_baseline) -> Iterator[dict]:
  """Adds the baselines' `mask_prob` and `depth_pred` to each batch (they see [0, 1] images)."""
  for batch in batches:
    bg, fg_bg = pipeline.denormalize(batch)
    yield dict(batch, mask_prob=mask_baseline.predict(bg, fg_bg).astype(np.float32),
               depth_pred=depth_baseline.predict(len(bg)).astype(np.float32))


def evaluate_baselines(config, mesh: Mesh, split: str, num_examples: int = -1, *,
                       wrap_step: Callable[[Callable], Callable] | None = None) -> dict[str, float]:
  """Fits both baselines on training data and evaluates them on `split` (`baseline_` keys).

  `wrap_step`, if given, wraps the jitted step, e.g. to look at each batch's predictions.
  """
  mask_baseline, depth_baseline = fit_baselines(config)
  batches = pipeline.create_eval_batches(config, split, num_examples,
                                         batch_size=config.eval_batch_size)
  step = make_baseline_step(mesh)
  return evaluator.evaluate(wrap_step(step) if wrap_step else step, None,
                  with_baseline_predictions(batches, mask_baseline, depth_baseline), mesh,
                  prefix="baseline_")


def baseline_step(_, batch) -> metrics_lib.EvalMetrics:
  return metrics_lib.compute_metrics(batch["mask_prob"], batch["depth_pred"], batch)


def make_baseline_step(mesh: Mesh) -> Callable:
  return jax.jit(baseline_step,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))
