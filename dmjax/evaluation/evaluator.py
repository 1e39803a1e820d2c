"""The held-out evaluation step and loop: one metric collection (`metrics.EvalMetrics`) merged
over batches, on every device of every process.

Batches come from `pipeline.create_eval_batches` (host-local, the last one padded with
`example_weight` 0); `parallel.to_global` turns them into arrays sharded over every device of
every process, so the same jitted evaluation runs on one CPU or many hosts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
from jax.sharding import Mesh

from dmjax import errors, models, parallel
from dmjax.evaluation import metrics as metrics_lib


def predict(model, variables, batch) -> tuple[jax.Array, jax.Array]:
  """Mask probability and depth in [0, 1], float32, for a batch of the pipeline."""
  return models.predict_probabilities(model, variables, batch["bg"], batch["fg_bg"])


def eval_step(variables, batch, *, model) -> metrics_lib.EvalMetrics:
  mask_prob, depth_pred = predict(model, variables, batch)
  return metrics_lib.compute_metrics(mask_prob, depth_pred, batch)


def make_local_predict(model) -> Callable:
  """`predict` jitted for one device: e.g. the chief's example images, on its own copy of the
  parameters (`parallel.local_device_copy`), which the other processes need not join. Make it
  once: each new jitted function traces and compiles again."""
  return jax.jit(functools.partial(predict, model))


def make_eval_step(model, mesh: Mesh) -> Callable:
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def evaluate(step_fn: Callable, variables, batches: Iterable[dict], mesh: Mesh,
             prefix: str = "") -> dict[str, float]:
  """Merges `step_fn(variables, batch)` metric collections over batches into a flat dict.

  Each step's (replicated) sums come to the host and are merged there: merging global arrays
  would make every process launch a tiny program over all devices of all processes per batch.
  `variables` (host arrays, or global ones already) are placed once, replicated on the mesh,
  not sent to the devices with every batch.
  """
  collection = None
  sharding = parallel.batch_sharding(mesh)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  for batch in batches:
    update = parallel.local_copy(step_fn(variables, parallel.to_global(batch, sharding)))
    collection = update if collection is None else collection.merge(update)
  if collection is None:
    raise errors.UserError("evaluation got no batches: is the split empty?")
  return {prefix + k: float(v) for k, v in collection.compute().items()}
