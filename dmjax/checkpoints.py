"""Orbax checkpoints of a run, in WORKDIR/checkpoints.

Every step's checkpoint holds up to four items, so each tool restores only what it needs:

  model   {"params", "batch_stats"}      all a model needs to predict (evaluate, predict, init_from)
  train   {"step", "opt_state", "rng"}  what resuming training needs on top
  data    the grain iterator state       so a resumed run sees exactly the batches that come next
  config  the run's config as JSON       so every tool rebuilds the same model and data

Orbax writes each checkpoint into a temporary folder and renames it when complete, so an
interrupted save (even by `kill -9`) never replaces or corrupts the last good one; the next start
removes the leftover. Which steps are saved is orbax's decision (`save_policy`).

Each step also records how many processes wrote it. A run with another number of processes
restores the model and training state into its own devices, and continues the data at global
batch `step` instead of restoring each process's iterator: every process's local batch k is its
share of global batch k whatever their number, so the run sees the same examples in the same
order as it would have. Only the order of floating-point sums across devices changes.
"""

from __future__ import annotations

import json
import os

import grain.checkpoint as grain_checkpoint
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dmjax import config as config_lib
from dmjax import errors

ITEMS = ("model", "train", "data", "config")
PROCESS_COUNT_KEY = "dmjax_process_count"  # In each step's custom metadata.


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def save_policy(every: int, steps=()) -> ocp.checkpoint_managers.SaveDecisionPolicy:
  """Orbax's decision of which steps to save: every `every` steps (0: never), the given `steps`
  (the last), and the step all processes agreed on after a pre-emption notice (JAX's sync point;
  see dmjax.preemption)."""
  policies = [ocp.checkpoint_managers.SpecificStepsPolicy(frozenset(steps)),
              ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
  if every > 0:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every))
  return ocp.checkpoint_managers.AnySavePolicy(policies)


def create_manager(workdir: str, *, keep: int = 3, save_every: int = 0, save_on_steps=(),
                   async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager; `manager.should_save(step)` follows `save_policy`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save,
      save_decision_policy=save_policy(save_every, save_on_steps),
      # A save that `kill -9` interrupted leaves a temporary folder; remove it on the next start.
      cleanup_tmp_directories=not read_only)
  handlers = {
      "model": ocp.StandardCheckpointHandler(),
      "train": ocp.StandardCheckpointHandler(),
      "data": grain_checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                               item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, *, model, config: ml_collections.ConfigDict,
         train=None, data_iterator=None, force: bool = False) -> bool:
  """Saves `step` (asynchronously) if the manager's policy, or `force`, says so; returns whether
  it did. Every process must call it with the same arguments."""
  items = {"model": ocp.args.StandardSave(model),
           "config": ocp.args.JsonSave(json.loads(config.to_json()))}
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  if data_iterator is not None:
    items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
  # The number of processes that wrote the data iterator states: another number resumes by
  # position instead (see `restore`).
  return manager.save(step, args=ocp.args.Composite(**items), force=force,
                      custom_metadata={PROCESS_COUNT_KEY: jax.process_count()})


def saved_process_count(manager: ocp.CheckpointManager, step: int) -> int | None:
  """How many processes wrote `step`, or None for checkpoints that do not say (older ones)."""
  custom = manager.metadata(step).custom_metadata or {}
  return custom.get(PROCESS_COUNT_KEY)


def _key_name(entry) -> str:
  # Saved trees come back as dicts and lists where the live one has named tuples (optax
  # states): compare 'opt_state/1/0/mu', whichever kind of node a name came from.
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _describe(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(_key_name(e) for e in path): tuple(leaf.shape) for path, leaf in leaves}


def check_compatible(saved, expected, *, what: str) -> None:
  """Raises a one-line UserError naming the first key whose presence or shape differs."""
  saved_desc, expected_desc = _describe(saved), _describe(expected)
  for key in sorted(expected_desc.keys() | saved_desc.keys()):
    if key not in saved_desc:
      raise errors.UserError(f"{what}: checkpoint has no {key} (this run expects shape "
                             f"{expected_desc[key]}); was it written by another model or "
                             "optimizer?")
    if key not in expected_desc:
      raise errors.UserError(f"{what}: checkpoint has {key} with shape {saved_desc[key]}, which "
                             "this run does not have; was it written by another model or "
                             "optimizer?")
    if saved_desc[key] != expected_desc[key]:
      raise errors.UserError(f"{what}: {key} has shape {saved_desc[key]} in the checkpoint but "
                             f"{expected_desc[key]} in this run")


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(manager: ocp.CheckpointManager, step: int, *, model, train=None, data_iterator=None,
            sharding=None):
  """Restores the named items of `step` into the shapes (and `sharding`) of the given trees.

  `model` and `train` are trees of arrays or ShapeDtypeStructs giving the expected structure;
  a checkpoint of another model or size fails with a one-line error naming the key.
  Returns (model, train, data_restored), train None when not asked for. The iterator is restored
  in place when the checkpoint was written by as many processes as this run has; otherwise
  (or when the checkpoint does not say) data_restored is False and the caller repositions it.
  """
  metadata = manager.item_metadata(step)
  where = f"checkpoint {manager.directory}/{step}"
  check_compatible(metadata["model"], model, what=where)
  items = {"model": ocp.args.StandardRestore(_abstract(model, sharding))}
  if train is not None:
    if metadata.get("train") is None:
      raise errors.UserError(f"{where} holds a model without training state (imported or "
                             "exported); start a new run from it with --config.init_from instead")
    check_compatible(metadata["train"], train, what=where)
    items["train"] = ocp.args.StandardRestore(_abstract(train, sharding))
  data_restored = (data_iterator is not None
                   and saved_process_count(manager, step) == jax.process_count())
  if data_restored:
    items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["model"], restored.get("train") if train is not None else None, data_restored


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with, in today's keys (`config.upgrade_saved`)."""
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_lib.upgrade_saved(restored["config"])


def restore_model(workdir: str, step: int | None = None):
  """Returns (config, variables, step) of a workdir's latest (or given) checkpoint, as numpy.

  This is how evaluation, prediction and `init_from` read a run, whichever way it was written.
  """
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"{checkpoint_dir(workdir)}: no checkpoints here; is {workdir!r} the "
                            "workdir of a training run?")
  manager = create_manager(workdir, read_only=True, async_save=False)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{checkpoint_dir(workdir)}: no complete checkpoint in it")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise errors.UserError(f"{checkpoint_dir(workdir)}: no checkpoint of step {step}; have "
                           f"{steps}")
  # Restore onto this process's first device, whatever topology wrote the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = _abstract(manager.item_metadata(step)["model"], device)
  restored = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
  manager.close()
  config = config_lib.upgrade_saved(restored["config"])
  variables = jax.tree.map(np.asarray, restored["model"])
  return config, variables, step


def save_imported_model(workdir: str, config: ml_collections.ConfigDict, variables) -> None:
  """Writes weights made elsewhere as step 0 of a workdir, refusing to overwrite a run."""
  if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
    raise errors.UserError(f"{checkpoint_dir(workdir)} already holds checkpoints; choose an "
                           "empty workdir")
  manager = create_manager(workdir, async_save=False)
  save(manager, 0, model=variables, config=config, force=True)
  manager.wait_until_finished()
  manager.close()
