"""Training and evaluation, as small functions ending in `train_and_evaluate(config, workdir)`.

Data parallelism is `jax.jit` over globally sharded arrays: a one-axis mesh spans every device of
every process, each batch is split along it, parameters are replicated, and XLA inserts the
cross-device reductions. Gradients and BatchNorm statistics are therefore those of the whole
global batch, so the result does not depend on how many devices share it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from dmjax import (
  checkpoints,
  errors,
  files,
  losses,
  models,
  parallel,
  preemption,
  progress,
  summaries,
  visualize,
)
from dmjax import config as config_lib
from dmjax.data import augment, pipeline, sources
from dmjax.evaluation import baselines, evaluator
from dmjax.evaluation import metrics as metrics_lib
from dmjax.models import layers


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_learning_rate_schedule(opt: ml_collections.ConfigDict,
                                  num_train_steps: int) -> optax.Schedule:
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(num_train_steps, opt.warmup_steps + 1), end_value=opt.learning_rate * 1e-2)
  if opt.schedule == "step":
    if opt.step_every <= 0:
      return optax.constant_schedule(opt.learning_rate)
    return optax.exponential_decay(opt.learning_rate, transition_steps=opt.step_every,
                                   decay_rate=opt.step_factor, staircase=True)
  if opt.schedule == "one_cycle":
    # PyTorch's OneCycleLR(pct_start=0.5, anneal_strategy='linear', final_div_factor=1) as seed
    # 003 stepped it every batch: linear up until step 0.5·T - 1, then linear back down at T - 1.
    low, peak = opt.learning_rate * opt.one_cycle_start, opt.learning_rate
    turn = max(0.5 * num_train_steps - 1, 1.0)
    return optax.join_schedules(
        [optax.linear_schedule(low, peak, turn),
         optax.linear_schedule(peak, low, max(num_train_steps - 1 - turn, 1.0))], [turn])
  raise errors.UserError(f"config.optimizer.schedule={opt.schedule!r}: expected 'cosine', 'step' "
                         "or 'one_cycle'")

def _is_kernel(params):
  # Decay convolution kernels only: decaying BatchNorm scales and biases only fights the norm.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  schedule = create_learning_rate_schedule(opt, config.num_train_steps)
  if opt.name == "adamw":
    base = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=_is_kernel)
  elif opt.name == "sgd":
    # PyTorch's SGD weight decay, as the seed used it: L2 added to every gradient.
    base = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                       optax.sgd(schedule, momentum=opt.momentum))
  else:
    raise errors.UserError(f"config.optimizer.name={opt.name!r}: expected 'adamw' or 'sgd'")
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), base)
  return base


def initial_variables(model, rng: jax.Array, resolution: int):
  if resolution % layers.SIZE_MULTIPLE:
    raise errors.UserError(f"config.data.resolution={resolution}: must be divisible by "
                           f"{layers.SIZE_MULTIPLE}")
  images = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
  return model.init(rng, images, images, train=False)


def create_train_state(config, model, tx, rng: jax.Array) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = initial_variables(model, init_rng, config.data.resolution)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]), rng=state_rng)


def train_step(state: TrainState, batch, *, model, tx, loss_config, preprocess=None):
  """One optimisation step on a global batch; returns the new state and the loss terms.

  `preprocess(batch, key, step)`, if given, turns the batch the host sent into model inputs
  (`dmjax.data.augment`).
  """
  if preprocess is not None:
    batch = preprocess(batch, state.rng, state.step)

  def loss_fn(params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["bg"], batch["fg_bg"],
        train=True, mutable=["batch_stats"],
        **models.train_inputs(model, batch, state.rng, state.step))
    total, terms = losses.compute_losses(outputs, batch, loss_config)
    return total, (dict(terms, total=total), updates["batch_stats"])

  grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  # The loss and gradient are those of the parameters before the update; the norm of those after
  # it says whether the state a save would write is finite (`check_finite`).
  return new_state, dict(terms, grad_norm=optax.global_norm(grads),
                         param_norm=optax.global_norm(new_state.params))


def make_train_step(model, tx, loss_config, mesh, preprocess=None):
  replicated = parallel.replicated(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, loss_config=loss_config,
                                   preprocess=preprocess),
                 in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def split_state(state: TrainState):
  """The (model, train) checkpoint items of a state."""
  return state.variables, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def join_state(model_item, train_item) -> TrainState:
  return TrainState(step=train_item["step"], params=model_item["params"],
                    batch_stats=model_item["batch_stats"], opt_state=train_item["opt_state"],
                    rng=train_item["rng"])


def load_previous_stage(state: TrainState, config) -> TrainState:
  """Starts from another run's final parameters (progressive resizing), with a fresh optimizer."""
  previous_config, variables, step = checkpoints.restore_model(config.init_from)
  if previous_config.model.name != config.model.name:
    raise errors.UserError(f"config.init_from={config.init_from!r} trained "
                           f"{previous_config.model.name}, not {config.model.name}")
  checkpoints.check_compatible(variables, state.variables, what=f"init_from {config.init_from}")
  logging.info("Starting from %s, step %d.", config.init_from, step)
  # Where the state's own arrays are (replicated on the mesh), not on the default device.
  return state.replace(params=_placed_like(variables["params"], state.params),
                       batch_stats=_placed_like(variables["batch_stats"], state.batch_stats))


def _placed_like(values, like):
  return jax.device_put(values, jax.tree.map(lambda x: x.sharding, like))


class _FrozenIterator:
  """The state of a data iterator at one moment, as grain's checkpoint handler reads it.

  Asynchronous saves finish after training has moved on; the state must be the one that goes
  with the saved model.
  """

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self):
    return self._state


def warn_about_config_changes(saved: ml_collections.ConfigDict,
                              config: ml_collections.ConfigDict) -> None:
  """Resuming with other settings is allowed (say, more steps), but should not go unnoticed."""
  before, now = dict(_flatten(saved.to_dict())), dict(_flatten(config.to_dict()))
  changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
             if before.get(k) != now.get(k)]
  if changed:
    logging.warning("Resuming with a config that differs from the checkpoint's: %s",
                    "; ".join(changed))


def check_finite(history: list[tuple[int, dict]]) -> None:
  """Raises at the first step whose loss terms, gradient or updated parameters (`param_norm`)
  are not finite. Run on every step up to a save before it: no saved state is non-finite."""
  for step, terms in history:
    if not all(math.isfinite(v) for v in terms.values()):
      shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
      raise errors.NonFiniteLossError(f"non-finite loss or parameters at step {step}: {shown}; "
                                      "stopping, the last checkpoint is left as it was")


@jax.jit
def accumulate_terms(window, step, terms):
  """The log window (None: a new one) with one more step's loss terms, kept on the device: their
  sums, and the first step whose terms are not all finite, with those terms. Fetched once per
  window (`read_window`), not once per step."""
  if window is None:
    zeros = jax.tree.map(jnp.zeros_like, terms)
    window = {"sums": zeros, "bad_step": jnp.int32(-1), "bad_terms": zeros}
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(terms)]))
  first_bad = (window["bad_step"] < 0) & ~finite
  return {"sums": jax.tree.map(jnp.add, window["sums"], terms),
          "bad_step": jnp.where(first_bad, step, window["bad_step"]),
          "bad_terms": jax.tree.map(lambda kept, new: jnp.where(first_bad, new, kept),
                                    window["bad_terms"], terms)}


def read_window(window, num_steps: int) -> dict[str, float]:
  """The mean loss terms of a log window of `num_steps` steps, in one transfer from the device;
  `check_finite`'s error at its first non-finite step, if any."""
  fetched = jax.device_get(window)
  if int(fetched["bad_step"]) >= 0:
    check_finite([(int(fetched["bad_step"]),
                   {k: float(v) for k, v in fetched["bad_terms"].items()})])
  return {k: float(v) / num_steps for k, v in fetched["sums"].items()}


def write_examples(writer, step: int, variables, eval_batch, predict, num: int = 6) -> None:
  """The chief's example grid; `predict` is `evaluator.make_local_predict`'s, made once."""
  batch = {k: v[:num] for k, v in eval_batch.items()}
  # The chief predicts alone, on its own device's copy of the replicated parameters.
  mask_prob, depth_pred = jax.device_get(predict(parallel.local_device_copy(variables), batch))
  bg, fg_bg = pipeline.denormalize(batch)
  grid = visualize.example_grid(bg, fg_bg, batch["mask"], mask_prob, batch["depth"], depth_pred)
  writer.write_images(step, {"examples": grid[None]})


def is_due(step: int, every: int) -> bool:
  """Whether a periodic action runs at `step`; every 0 steps means never."""
  return every > 0 and step % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, writer=None) -> dict:
  """Trains (resuming from the workdir's latest checkpoint) and returns the final metrics.

  Raises `preemption.Preempted` when SIGTERM stopped it after saving a step. One run at a time
  may write a workdir (`checkpoints.hold_workdir`).
  """
  config_lib.validate(config)
  config = sources.with_absolute_data_dir(config)  # As saved: evaluate finds it from anywhere.
  with checkpoints.hold_workdir(workdir):
    return _train_and_evaluate(config, workdir, writer=writer)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, writer) -> dict:
  # CLU's writers and periodic actions, with or without TensorFlow (dmjax.summaries).
  summaries.metric_writers()
  from clu import periodic_actions  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  writer = writer or summaries.create_default_writer(workdir, just_logging=not is_chief)

  manager = checkpoints.create_manager(
      workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every_steps,
      save_on_steps=(config.num_train_steps,))
  latest = manager.latest_step()
  stop = preemption.StopSignal(manager, latest or 0)
  pipeline.prepare(config)
  mesh = parallel.create_mesh()
  model = models.create_model(config.model)
  tx = create_optimizer(config)
  state = jax.device_put(create_train_state(config, model, tx, jax.random.PRNGKey(config.seed)),
                         parallel.replicated(mesh))
  train_iter = pipeline.create_train_iterator(config)

  examples_at_start = 0  # Of the training stream, used before this run's first step.
  if latest is not None:
    model_item, train_item, data_restored = checkpoints.restore(
        manager, latest, model=state.variables, train=split_state(state)[1],
        data_iterator=train_iter, sharding=parallel.replicated(mesh))
    state = join_state(model_item, train_item)
    warn_about_config_changes(checkpoints.restore_config(manager, latest), config)
    examples_at_start = checkpoints.examples_seen(manager, latest)
    if not data_restored:
      # Written by another number of processes (or does not say). Local batch k of every process
      # is its share of global batch k whatever their number, so the stream continues with the
      # same examples.
      saved_by = checkpoints.saved_process_count(manager, latest)
      next_batch = checkpoints.continue_data(manager, latest, train_iter,
                                             batch_size=config.batch_size)
      logging.info("The checkpoint was saved by a run of %s process(es), this one has %d: "
                   "continuing the data at global batch %d.",
                   "an unrecorded number of" if saved_by is None else saved_by,
                   jax.process_count(), next_batch)
    logging.info("Resumed from %s at step %d.", manager.directory, latest)
  elif config.init_from:
    state = load_previous_stage(state, config)
  else:
    writer.write_hparams(dict(_flatten(config.to_dict())))

  p_train_step = make_train_step(model, tx, config.loss, mesh,
                                 augment.make_preprocess(config))
  p_eval_step = evaluator.make_eval_step(model, mesh)
  p_example_predict = evaluator.make_local_predict(model)
  schedule = create_learning_rate_schedule(config.optimizer, config.num_train_steps)
  train_batches = parallel.DevicePrefetcher(train_iter, parallel.batch_sharding(mesh))

  def run_eval(step: int, num_examples: int) -> dict[str, float]:
    batches = pipeline.create_eval_batches(config, config.data.eval_split, num_examples,
                                           batch_size=config.eval_batch_size)
    results = evaluator.evaluate(p_eval_step, state.variables, batches, mesh)
    if is_chief:
      first = next(iter(pipeline.create_eval_batches(config, config.data.eval_split, 8,
                                                     batch_size=8, process_index=0,
                                                     process_count=1)))
      write_examples(writer, step, state.variables, first, p_example_predict)
    writer.write_scalars(step, {"eval/" + k: v for k, v in results.items()})
    return results

  initial_step = int(state.step)
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           writer=writer)] if is_chief else []
  if config.profile and is_chief:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))
  window = None  # The loss terms since the last log, summed on the device.
  window_start, window_step = time.time(), initial_step
  started = time.time()
  stop.listen()
  try:
    for step in range(initial_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, terms = p_train_step(state, next(train_batches))
      window = accumulate_terms(window, step, terms)
      for hook in hooks:
        hook(step)

      last = step == config.num_train_steps
      # One decision per step, taken before its host work: a signal that arrives during that
      # work is the next step's business, never half-acted on here. Every process asks at every
      # step (see dmjax.preemption).
      stopping = stop.reached(step)
      should_save = stopping or manager.should_save(step)
      if should_save or is_due(step, config.log_every_steps):
        means = read_window(window, step - window_step)  # Raises at a non-finite step.
        elapsed = time.time() - window_start
        rate = (step - window_step) / max(elapsed, 1e-9)
        scalars = {"train/" + k: v for k, v in means.items()}
        scalars.update({"train/learning_rate": float(schedule(step - 1)),
                        "train/steps_per_sec": rate,
                        "train/images_per_sec": rate * config.batch_size})
        writer.write_scalars(step, scalars)
        eta = (config.num_train_steps - step) / max(rate, 1e-9)
        logging.info("step %d/%d  loss %.4f  %.2f steps/s  %.0f images/s  ETA %s", step,
                     config.num_train_steps, scalars["train/total"], rate,
                     rate * config.batch_size, progress.format_duration(eta))
        window, window_start, window_step = None, time.time(), step
      if is_due(step, config.eval_every_steps) and not last and not stopping:
        run_eval(step, config.data.num_eval_examples)
      if should_save:
        model_item, train_item = split_state(state)
        # Forced only for a single process's own SIGTERM, which orbax's policy does not see.
        checkpoints.save(manager, step, model=model_item, train=train_item, config=config,
                         data_iterator=_FrozenIterator(train_batches), force=stopping,
                         examples_seen=examples_at_start
                         + (step - initial_step) * config.batch_size)
      if stopping:
        manager.wait_until_finished()
        logging.warning("Saved step %d after SIGTERM; re-run the same command to resume.", step)
        writer.flush()
        raise preemption.Preempted(step)
  finally:
    stop.close()
    train_iter.close()  # Its worker processes, if any, are not needed for evaluation.
    manager.wait_until_finished()

  logging.info("Training took %s; evaluating.", progress.format_duration(time.time() - started))
  results = run_eval(config.num_train_steps, -1)
  results.update(baselines.evaluate_baselines(config, mesh, config.data.eval_split))
  writer.write_scalars(config.num_train_steps,
                       {"final/" + k: v for k, v in results.items()})
  writer.flush()
  if is_chief:
    files.write_json(os.path.join(workdir, "final_metrics.json"), results)
    logging.info("Final held-out metrics:\n%s", metrics_lib.format_table(results))
  manager.close()
  return results


def _flatten(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v
