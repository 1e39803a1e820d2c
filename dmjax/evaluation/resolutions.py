"""Evaluation at the size of people's photos: held-out synthetic scenes rendered at chosen sizes,
predicted as `dmjax.predict` would (a `Predictor` and its `fit`), scored at full resolution."""

from __future__ import annotations

import jax
import numpy as np

from dmjax import inference
from dmjax.data import schema, synthetic
from dmjax.evaluation import metrics as metrics_lib

RESOLUTION_KEYS = ("mask_iou", "mask_iou_per_image", "mask_boundary_f", "depth_rmse",
                   "depth_rmse_aligned", "depth_delta1", "depth_delta1_aligned", "checkerboard")


def stored_labels(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A stored example's mask (binarised at 0.5, as training binarises it) and depth, float32
  in [0, 1], (1, H, W, 1)."""
  mask = (example["mask"].astype(np.float32) / 255.0 >= metrics_lib.MASK_THRESHOLD)
  depth = example["depth"].astype(np.float32) / schema.DEPTH_MAX_CODE
  return {"mask": mask.astype(np.float32)[None], "depth": depth[None]}


def evaluate_at_resolutions(predictor: inference.Predictor, resolutions: list[int], *,
                            num_examples: int, scene_seed: int = 0,
                            progress=None) -> dict[int, dict[str, float]]:
  """The first `num_examples` held-out synthetic test scenes, rendered at each resolution and
  predicted and scored there, at full resolution (rooms training never saw).

  Scenes are the same at every resolution (dmjax.data.synthetic), so the rows differ only in
  the size the model is given.
  """
  results = {}
  for resolution in resolutions:
    collection, boundary_f = None, []
    for index in range(num_examples):
      example = synthetic.render_example("test", index, resolution=resolution, seed=scene_seed)
      mask, depth = predictor(example["bg"], example["fg_bg"])
      labels = stored_labels(example)
      update = jax.device_get(metrics_lib.compute_metrics(mask[None, ..., None],
                                                          depth[None, ..., None], labels))
      collection = update if collection is None else collection.merge(update)
      boundary_f.append(metrics_lib.boundary_f_score(mask[None], labels["mask"]))
      if progress:
        progress(resolution, index + 1, num_examples)
    metrics = {k: float(v) for k, v in collection.compute().items()}
    metrics["mask_boundary_f"] = float(np.mean(np.concatenate(boundary_f)))
    metrics["num_examples"] = num_examples
    results[resolution] = metrics
  return results


def format_resolution_table(results: dict[int, dict[str, float]]) -> str:
  lines = [f"{'size':>6}" + "".join(f"{k:>22}" for k in RESOLUTION_KEYS)]
  for resolution, metrics in results.items():
    lines.append(f"{resolution:>6}" + "".join(f"{metrics[k]:>22.4f}" for k in RESOLUTION_KEYS))
  return "\n".join(lines)
