"""Held-out evaluation of a model and of the two data baselines, with one metric collection.

Batches come from `pipeline.create_eval_batches` (host-local, the last one padded with
`example_weight` 0); `to_global` turns them into arrays sharded over every device of every
process, so the same jitted evaluation runs on one CPU or many hosts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dmjax import errors, models
from dmjax import metrics as metrics_lib
from dmjax.data import baselines as baselines_lib
from dmjax.data import pipeline

BATCH_AXIS = "batch"


def create_mesh() -> Mesh:
  """A one-axis mesh over every device of every process: data parallelism.

  The axis is `Auto`: batches are sharded along it and XLA propagates the sharding through the
  model (recent JAX defaults to `Explicit`, which would ask every reshape for its sharding).
  """
  return jax.make_mesh((jax.device_count(),), (BATCH_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's part of a batch into one array sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def local_copy(tree):
  """This process's copy of replicated global arrays, as numpy: it can be used without
  collectives, by one process alone."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def predict(model, variables, batch) -> tuple[jax.Array, jax.Array]:
  """Mask probability and depth in [0, 1], float32, for a batch of the pipeline."""
  return models.predict_probabilities(model, variables, batch["bg"], batch["fg_bg"])


def eval_step(variables, batch, *, model) -> metrics_lib.EvalMetrics:
  mask_prob, depth_pred = predict(model, variables, batch)
  return metrics_lib.compute_metrics(mask_prob, depth_pred, batch)


def make_eval_step(model, mesh: Mesh) -> Callable:
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


def evaluate(step_fn: Callable, variables, batches: Iterable[dict], mesh: Mesh,
             prefix: str = "") -> dict[str, float]:
  """Merges `step_fn(variables, batch)` metric collections over batches into a flat dict.

  Each step's (replicated) sums come to the host and are merged there: merging global arrays
  would make every process launch a tiny program over all devices of all processes per batch.
  """
  collection = None
  sharding = batch_sharding(mesh)
  for batch in batches:
    update = local_copy(step_fn(variables, to_global(batch, sharding)))
    collection = update if collection is None else collection.merge(update)
  if collection is None:
    raise errors.UserError("evaluation got no batches: is the split empty?")
  return {prefix + k: float(v) for k, v in collection.compute().items()}


def fit_baselines(config, num_examples: int = 512):
  """Fits the |fg_bg − bg| threshold and the mean depth map on (unaugmented) training data.

  Every process reads the same examples, so all of them fit the same baselines.
  """
  batches = pipeline.create_eval_batches(config, "train", num_examples, process_index=0,
                                         process_count=1)
  batches = [_unpadded(b) for b in batches]
  mask_baseline = baselines_lib.DifferenceMaskBaseline()
  mask_baseline.fit([(*pipeline.denormalize(b), b["mask"]) for b in batches])
  depth_baseline = baselines_lib.MeanDepthBaseline()
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
  return evaluate(wrap_step(step) if wrap_step else step, None,
                  with_baseline_predictions(batches, mask_baseline, depth_baseline), mesh,
                  prefix="baseline_")


def baseline_step(_, batch) -> metrics_lib.EvalMetrics:
  return metrics_lib.compute_metrics(batch["mask_prob"], batch["depth_pred"], batch)


def make_baseline_step(mesh: Mesh) -> Callable:
  return jax.jit(baseline_step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
