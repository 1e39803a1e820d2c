"""Evaluation of a saved run's checkpoint on a held-out split, beside the two data baselines:
the metric collection, the per-image boundary F-score, the worst and best examples, and the files
`dmjax.evaluate` writes (JSON, contact sheet, TensorBoard summaries).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np

from dmjax import checkpoints, errors, files, models, parallel, progress, summaries, visualize
from dmjax.data import original_layout, pipeline, sources
from dmjax.data.schema import DEPTH_VALID_MIN
from dmjax.evaluation import baselines, evaluator, trained_data
from dmjax.evaluation import metrics as metrics_lib


def _iou_error(example):
  predicted = example["mask_prob"] > metrics_lib.MASK_THRESHOLD
  actual = example["mask"] > metrics_lib.MASK_THRESHOLD
  union = np.sum(predicted | actual, axis=(1, 2, 3))
  intersection = np.sum(predicted & actual, axis=(1, 2, 3))
  # Nothing there and nothing predicted is right, as in metrics.mask_iou_per_image.
  return 1.0 - np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def _depth_rmse(example):
  valid = example["depth"] >= DEPTH_VALID_MIN
  squared = np.where(valid, (example["depth_pred"] - example["depth"]) ** 2, 0.0)
  return np.sqrt(squared.sum(axis=(1, 2, 3)) / np.maximum(valid.sum(axis=(1, 2, 3)), 1))


# Per-example errors to rank by (higher is worse), each a function of host arrays with
# `mask_prob`, `depth_pred`, the labels and `mask_boundary_f`. "combined" adds mask and depth
# errors, both in [0, 1], so a bad mask or bad depth can make an example one of the worst.
EXAMPLE_ERRORS = {
    "combined": lambda e: _iou_error(e) + _depth_rmse(e),
    "mask_iou": _iou_error,
    "mask_boundary_f": lambda e: 1.0 - e["mask_boundary_f"],
    "depth_rmse": _depth_rmse,
}


@dataclasses.dataclass
class ExampleTally:
  """Per-example results over the batches of an evaluation: the boundary F-scores, and the
  `num_kept` worst and best examples by `error`, with their predictions."""

  error: str = "combined"
  num_kept: int = 0
  boundary_f: list = dataclasses.field(default_factory=list)
  worst: dict | None = None
  best: dict | None = None
  num_seen: int = 0

  def add(self, batch: dict, mask_prob, depth_pred) -> None:
    batch = jax.device_get(batch)
    keep = np.asarray(batch["example_weight"]) > 0
    examples = {k: np.asarray(v)[keep] for k, v in batch.items()
                if k in ("bg", "fg_bg", "mask", "depth")}
    examples["mask_prob"] = np.asarray(mask_prob)[keep]
    examples["depth_pred"] = np.asarray(depth_pred)[keep]
    examples["mask_boundary_f"] = metrics_lib.boundary_f_score(examples["mask_prob"],
                                                               examples["mask"])
    examples["index"] = self.num_seen + np.arange(int(keep.sum()))
    self.num_seen += int(keep.sum())
    self.boundary_f.append(examples["mask_boundary_f"])
    if self.num_kept:
      examples["error"] = EXAMPLE_ERRORS[self.error](examples)
      self.worst = _keep_extreme(self.worst, examples, self.num_kept, largest=True)
      self.best = _keep_extreme(self.best, examples, self.num_kept, largest=False)

  def mean_boundary_f(self) -> float:
    return float(np.mean(np.concatenate(self.boundary_f)))

  def ranks(self) -> dict[str, list[dict]]:
    return {name: [{"index": int(i), "error": float(e)} for i, e in
                   zip(kept["index"], kept["error"], strict=True)]
            for name, kept in (("worst", self.worst), ("best", self.best)) if kept is not None}


def _keep_extreme(kept: dict | None, new: dict, count: int, *, largest: bool) -> dict:
  pool = new if kept is None else {k: np.concatenate([kept[k], new[k]]) for k in new}
  order = np.argsort(-pool["error"] if largest else pool["error"], kind="stable")[:count]
  return {k: v[order] for k, v in pool.items()}


def predict_and_measure(variables, batch, *, model):
  """The metric collection of a batch, and the predictions it was computed from."""
  mask_prob, depth_pred = evaluator.predict(model, variables, batch)
  return metrics_lib.compute_metrics(mask_prob, depth_pred, batch), mask_prob, depth_pred


def _recording(step_fn, tally: ExampleTally):
  """A step for `evaluator.evaluate` that also hands each batch's predictions to `tally`."""

  def step(variables, batch):
    collection, mask_prob, depth_pred = step_fn(variables, batch)
    tally.add(batch, mask_prob, depth_pred)
    return collection

  return step


def evaluation_config(config: ml_collections.ConfigDict, *, data_dir: str = "",
                      tfds_dir: str | None = None,
                      batch_size: int | None = None) -> ml_collections.ConfigDict:
  """A run's config pointed at other data (the original layout in `data_dir`), if asked."""
  config = ml_collections.ConfigDict(config.to_dict())
  if data_dir:
    config.data.source = "original"
    config.data.dir = os.path.abspath(data_dir)
  if tfds_dir is not None:
    config.data.tfds_dir = tfds_dir
  if batch_size:
    config.eval_batch_size = batch_size
  return config


@dataclasses.dataclass
class Evaluation:
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  split: str
  metrics: dict[str, float]
  tally: ExampleTally
  dataset: str = ""  # The built dataset evaluated (`builder/config`).
  # How that differs from the data the run trained on (None: it does not, or is not known), and
  # a note on which data was chosen, each said in one line.
  data_change: trained_data.DataChange | None = None
  data_note: str | None = None

  def notes(self) -> list[str]:
    return [n for n in (self.data_note, self.data_change and self.data_change.line()) if n]

  def to_json(self) -> dict:
    return {"workdir": os.path.abspath(self.workdir), "step": self.step, "split": self.split,
            "data": self.config.data.source, "data_dir": self.config.data.dir,
            "dataset": self.dataset, "num_examples": self.tally.num_seen,
            "rank_by": self.tally.error, "metrics": self.metrics,
            **({"data_change": self.data_change.to_json()} if self.data_change else {}),
            **({"data_note": self.data_note} if self.data_note else {}),
            **self.tally.ranks()}


def evaluate_checkpoint(workdir: str, *, step: int | None = None, split: str = "test",
                        num_examples: int = -1, data_dir: str = "", tfds_dir: str | None = None,
                        batch_size: int | None = None, num_kept: int = 4,
                        rank_by: str = "combined") -> Evaluation:
  """Restores a checkpoint and evaluates it and the baselines on `split`; says how the data
  differs from what the run trained on (`trained_data`)."""
  if rank_by not in EXAMPLE_ERRORS:
    raise errors.UserError(f"rank_by={rank_by!r}: expected one of {sorted(EXAMPLE_ERRORS)}")
  saved_config, variables, step = checkpoints.restore_model(workdir, step)
  config = evaluation_config(saved_config, data_dir=data_dir, tfds_dir=tfds_dir,
                             batch_size=batch_size)
  original_layout.scan.cache_clear()  # The data as it is now, not as this process last saw it.
  trained_on = trained_data.trained_dataset(workdir, step)
  config, data_note = trained_data.choose_config(config, saved_config, trained_on)
  pipeline.prepare(config)
  data_change = trained_data.compare(config, trained_on, split)
  mesh = parallel.create_mesh()
  model = models.create_model(config.model)

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  model_step = jax.jit(functools.partial(predict_and_measure, model=model),
                       in_shardings=(replicated, sharded),
                       out_shardings=(replicated, sharded, sharded))
  tally = ExampleTally(error=rank_by, num_kept=num_kept)
  batches = progress.track(
      pipeline.create_eval_batches(config, split, num_examples,
                                   batch_size=config.eval_batch_size),
      f"evaluate {split}", pipeline.num_eval_batches(config, split, num_examples),
      unit="batches")
  results = evaluator.evaluate(_recording(model_step, tally), variables, batches, mesh)
  _insert_after(results, "mask_iou_per_image", "mask_boundary_f", tally.mean_boundary_f())

  # The baselines' predictions ride in the batch (see baselines.with_baseline_predictions).
  baseline_tally = ExampleTally()
  baseline_results = baselines.evaluate_baselines(
      config, mesh, split, num_examples,
      wrap_step=lambda step: _recording(
          lambda v, b: (step(v, b), b["mask_prob"], b["depth_pred"]), baseline_tally))
  _insert_after(baseline_results, "baseline_mask_iou_per_image", "baseline_mask_boundary_f",
                baseline_tally.mean_boundary_f())
  return Evaluation(workdir=workdir, config=config, step=step, split=split,
                    metrics={**results, **baseline_results}, tally=tally,
                    dataset=sources.get_source(config).name, data_change=data_change,
                    data_note=data_note)


def _insert_after(results: dict, after: str, key: str, value: float) -> None:
  items = list(results.items())
  position = next((i + 1 for i, (k, _) in enumerate(items) if k == after), len(items))
  items.insert(position, (key, value))
  results.clear()
  results.update(items)


def contact_sheet(tally: ExampleTally, *, min_height: int = 96) -> np.ndarray:
  """The worst examples above the best ones, each block under a title; uint8 (H, W, 3).

  Small images are enlarged (nearest neighbour) to at least `min_height` rows each, to be seen.
  """
  blocks = []
  for title, kept in ((f"worst by {tally.error} error", tally.worst),
                      (f"best by {tally.error} error", tally.best)):
    bg, fg_bg = pipeline.denormalize(kept)
    grid = visualize.example_grid(bg, fg_bg, kept["mask"], kept["mask_prob"], kept["depth"],
                                  kept["depth_pred"])
    zoom = max(1, -(-min_height // kept["mask"].shape[1]))
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    blocks += [visualize.title_strip(title + ": bg, fg_bg, mask, predicted, depth, predicted",
                            grid.shape[1]), grid]
  return np.concatenate(blocks, axis=0)


def write_outputs(result: Evaluation, workdir: str, output: str | None) -> tuple[str, str]:
  """Writes the JSON, the contact sheet and the TensorBoard summaries; returns the two paths."""
  output = output or os.path.join(workdir, f"eval_{result.split}_{result.step}.json")
  sheet_path = os.path.splitext(output)[0] + "_examples.png"
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  files.write_json(output, result.to_json())
  sheet = contact_sheet(result.tally) if result.tally.worst is not None else None
  if sheet is not None:
    files.write_png(sheet_path, sheet)
  writer = summaries.metric_writers().SummaryWriter(workdir)  # TensorFlow's only if installed.
  prefix = f"evaluate/{result.split}/"
  writer.write_scalars(result.step, {prefix + k: v for k, v in result.metrics.items()})
  if sheet is not None:
    writer.write_images(result.step, {prefix + "examples": sheet[None]})
  writer.close()
  return output, sheet_path
