"""Evaluates a run's checkpoint on a held-out split, beside the two data baselines.

  python -m dmjax.evaluate --workdir=DIR [--split=test] [--step=N] [--output=FILE.json]
  python -m dmjax.evaluate --workdir=DIR --data_dir=/data/cats   # your copy of the seed layout

The latest (or `--step`) checkpoint is restored with the config saved beside it, which names the
model and the data; `--data_dir` swaps the data for the seed layout (SPEC §4) in that folder or
zip, built on first use into `--tfds_dir` (default: the run's). Reported, over every example of
the split: the whole metric collection of `dmjax.metrics`, `mask_boundary_f` (the per-image mean
of `metrics.boundary_f_score`), and all of them again for the baselines (`baseline_` prefix).

Written: the JSON (default WORKDIR/eval_SPLIT_STEP.json) with the metrics and the ranks of the
worst and best examples; beside it a PNG contact sheet of those examples (the worst first; the
columns of `visualize.example_grid`); TensorBoard scalars and the sheet under `evaluate/SPLIT/`
in WORKDIR. Examples are ranked by an error (`--rank_by`, see `EXAMPLE_ERRORS`).

This is a single-process tool: it uses every local device, and fetches predictions to the host.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from dmjax import checkpoints, errors, evaluation, models, predict, summaries, train, visualize
from dmjax import metrics as metrics_lib
from dmjax.data import pipeline, schema, synthetic
from dmjax.data.schema import DEPTH_VALID_MIN


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
  mask_prob, depth_pred = evaluation.predict(model, variables, batch)
  return metrics_lib.compute_metrics(mask_prob, depth_pred, batch), mask_prob, depth_pred


def _recording(step_fn, tally: ExampleTally):
  """A step for `evaluation.evaluate` that also hands each batch's predictions to `tally`."""

  def step(variables, batch):
    collection, mask_prob, depth_pred = step_fn(variables, batch)
    tally.add(batch, mask_prob, depth_pred)
    return collection

  return step


def evaluation_config(config: ml_collections.ConfigDict, *, data_dir: str = "",
                      tfds_dir: str | None = None,
                      batch_size: int | None = None) -> ml_collections.ConfigDict:
  """A run's config pointed at other data (the seed layout in `data_dir`), if asked."""
  config = ml_collections.ConfigDict(config.to_dict())
  if data_dir:
    config.data.source = "seed"
    config.data.dir = data_dir
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

  def to_json(self) -> dict:
    return {"workdir": os.path.abspath(self.workdir), "step": self.step, "split": self.split,
            "data": self.config.data.source, "data_dir": self.config.data.dir,
            "num_examples": self.tally.num_seen, "rank_by": self.tally.error,
            "metrics": self.metrics, **self.tally.ranks()}


def evaluate_checkpoint(workdir: str, *, step: int | None = None, split: str = "test",
                        num_examples: int = -1, data_dir: str = "", tfds_dir: str | None = None,
                        batch_size: int | None = None, num_kept: int = 4,
                        rank_by: str = "combined") -> Evaluation:
  """Restores a checkpoint and evaluates it and the baselines on `split`."""
  if rank_by not in EXAMPLE_ERRORS:
    raise errors.UserError(f"rank_by={rank_by!r}: expected one of {sorted(EXAMPLE_ERRORS)}")
  saved_config, variables, step = checkpoints.restore_model(workdir, step)
  config = evaluation_config(saved_config, data_dir=data_dir, tfds_dir=tfds_dir,
                             batch_size=batch_size)
  pipeline.prepare(config)
  mesh = evaluation.create_mesh()
  model = models.create_model(config.model)

  replicated, sharded = evaluation.replicated(mesh), evaluation.batch_sharding(mesh)
  model_step = jax.jit(functools.partial(predict_and_measure, model=model),
                       in_shardings=(replicated, sharded),
                       out_shardings=(replicated, sharded, sharded))
  tally = ExampleTally(error=rank_by, num_kept=num_kept)
  batches = pipeline.create_eval_batches(config, split, num_examples,
                                         batch_size=config.eval_batch_size)
  results = evaluation.evaluate(_recording(model_step, tally), variables, batches, mesh)
  _insert_after(results, "mask_iou_per_image", "mask_boundary_f", tally.mean_boundary_f())

  # The baselines' predictions ride in the batch (see evaluation.with_baseline_predictions).
  baseline_tally = ExampleTally()
  baseline_results = evaluation.evaluate_baselines(
      config, mesh, split, num_examples,
      wrap_step=lambda step: _recording(
          lambda v, b: (step(v, b), b["mask_prob"], b["depth_pred"]), baseline_tally))
  _insert_after(baseline_results, "baseline_mask_iou_per_image", "baseline_mask_boundary_f",
                baseline_tally.mean_boundary_f())
  return Evaluation(workdir=workdir, config=config, step=step, split=split,
                    metrics={**results, **baseline_results}, tally=tally)


def _insert_after(results: dict, after: str, key: str, value: float) -> None:
  items = list(results.items())
  position = next((i + 1 for i, (k, _) in enumerate(items) if k == after), len(items))
  items.insert(position, (key, value))
  results.clear()
  results.update(items)


# ---- Held-out synthetic scenes rendered at the size of people's photos.

RESOLUTION_KEYS = ("mask_iou", "mask_iou_per_image", "mask_boundary_f", "depth_rmse",
                   "depth_rmse_aligned", "depth_delta1", "depth_delta1_aligned", "checkerboard")


def stored_labels(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A stored example's mask (binarised at 0.5, as training binarises it) and depth, float32
  in [0, 1], (1, H, W, 1)."""
  mask = (example["mask"].astype(np.float32) / 255.0 >= metrics_lib.MASK_THRESHOLD)
  depth = example["depth"].astype(np.float32) / schema.DEPTH_MAX_CODE
  return {"mask": mask.astype(np.float32)[None], "depth": depth[None]}


def evaluate_at_resolutions(predictor: predict.Predictor, resolutions: list[int], *,
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


def _resolution_progress(resolution: int, done: int, total: int) -> None:
  end = "\n" if done == total or not sys.stderr.isatty() else ""
  if done == total or sys.stderr.isatty() or done % 8 == 0:
    print(f"\revaluate: {resolution} px, {done}/{total} scenes", end=end, file=sys.stderr,
          flush=True)


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
    blocks += [_title_strip(title + ": bg, fg_bg, mask, predicted, depth, predicted",
                            grid.shape[1]), grid]
  return np.concatenate(blocks, axis=0)


def _title_strip(text: str, width: int, height: int = 16) -> np.ndarray:
  strip = Image.new("RGB", (width, height), (255, 255, 255))
  ImageDraw.Draw(strip).text((4, 2), text, fill=(0, 0, 0))
  return np.asarray(strip)


def write_outputs(result: Evaluation, workdir: str, output: str | None) -> tuple[str, str]:
  """Writes the JSON, the contact sheet and the TensorBoard summaries; returns the two paths."""
  output = output or os.path.join(workdir, f"eval_{result.split}_{result.step}.json")
  sheet_path = os.path.splitext(output)[0] + "_examples.png"
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  train.write_json_atomically(output, result.to_json())
  sheet = contact_sheet(result.tally) if result.tally.worst is not None else None
  if sheet is not None:
    predict.write_png_atomically(sheet_path, sheet)
  writer = summaries.metric_writers().SummaryWriter(workdir)  # TensorFlow's only if installed.
  prefix = f"evaluate/{result.split}/"
  writer.write_scalars(result.step, {prefix + k: v for k, v in result.metrics.items()})
  if sheet is not None:
    writer.write_images(result.step, {prefix + "examples": sheet[None]})
  writer.close()
  return output, sheet_path


def parse_args(argv: list[str]) -> argparse.Namespace:
  # argparse rather than absl flags: those are process-global, and this module is imported
  # beside dmjax.predict and dmjax.main (tests, notebooks), which define flags of the same names.
  parser = argparse.ArgumentParser(prog="python -m dmjax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="A training run's workdir.")
  parser.add_argument("--split", default="test", help="The split to evaluate.")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  parser.add_argument("--output", default=None,
                      help="The JSON to write (default WORKDIR/eval_SPLIT_STEP.json).")
  parser.add_argument("--data_dir", default="",
                      help="Evaluate on the seed layout in this folder or zip instead.")
  parser.add_argument("--tfds_dir", default=None,
                      help="Where built datasets live (default: the run's config).")
  parser.add_argument("--num_examples", type=int, default=-1, help="First N examples; -1: all.")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="Evaluation batch size (default: the run's eval_batch_size).")
  parser.add_argument("--num_kept", type=int, default=4,
                      help="Worst and best examples each in the contact sheet; 0: no sheet.")
  parser.add_argument("--rank_by", default="combined", choices=sorted(EXAMPLE_ERRORS),
                      help="The per-example error that ranks them.")
  parser.add_argument("--resolution", default="",
                      help="Comma-separated sizes, e.g. 192,512,1024: score held-out synthetic "
                           "scenes rendered at each size, at full resolution, predicted as "
                           "dmjax.predict would (--fit), instead of the split.")
  parser.add_argument("--fit", default="auto", choices=predict.FITS,
                      help="With --resolution: how photos meet the model (see dmjax.predict).")
  return parser.parse_args(argv)


def main_resolutions(args: argparse.Namespace) -> None:
  try:
    resolutions = [int(r) for r in args.resolution.split(",")]
  except ValueError:
    raise SystemExit(f"error: --resolution={args.resolution!r}: expected sizes like "
                     "192,512") from None
  num_examples = 64 if args.num_examples < 0 else args.num_examples
  try:
    predictor = predict.Predictor.from_workdir(args.workdir, step=args.step, fit=args.fit,
                                               batch_size=1)
    results = evaluate_at_resolutions(predictor, resolutions, num_examples=num_examples,
                                      scene_seed=int(predictor.config.data.synthetic.seed),
                                      progress=_resolution_progress)
    output = args.output or os.path.join(
        args.workdir, f"eval_resolutions_{args.fit}_{predictor.step}.json")
    train.write_json_atomically(output, {
        "workdir": os.path.abspath(args.workdir), "step": predictor.step, "fit": args.fit,
        "metrics": {str(r): m for r, m in results.items()}})
  except (errors.UserError, FileNotFoundError) as e:  # The user's to fix; bugs keep tracebacks.
    raise SystemExit(f"error: {e}") from None
  print(f"{args.workdir} step {predictor.step}, fit={args.fit}, {num_examples} held-out "
        "synthetic scenes at each size:")
  print(format_resolution_table(results))
  print(f"Wrote {output}")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.resolution:
    main_resolutions(args)
    return
  try:
    result = evaluate_checkpoint(args.workdir, step=args.step, split=args.split,
                                 num_examples=args.num_examples, data_dir=args.data_dir,
                                 tfds_dir=args.tfds_dir, batch_size=args.batch_size,
                                 num_kept=args.num_kept, rank_by=args.rank_by)
    output, sheet_path = write_outputs(result, args.workdir, args.output)
  except (errors.UserError, FileNotFoundError) as e:
    # Bad input is the user's to fix: one line, not a traceback. Bugs keep their tracebacks.
    logging.debug("Traceback:", exc_info=True)
    raise SystemExit(f"error: {e}") from None
  model_keys = [k for k in result.metrics if not k.startswith("baseline_")]
  print(f"{args.workdir} step {result.step}, {result.split} split, "
        f"{result.tally.num_seen} examples:")
  print(train.format_metrics_table(result.metrics, keys=model_keys))
  print(f"Wrote {output}" + (f" and {sheet_path}" if result.tally.worst is not None else ""))


if __name__ == "__main__":
  main()
