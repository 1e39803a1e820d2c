"""Orbax checkpoints of a run, in WORKDIR/checkpoints.

Every step's checkpoint holds up to four items, so each tool restores only what it needs:

  model   {"params", "batch_stats"}      all a model needs to predict (evaluate, predict, init_from)
  train   {"step", "opt_state", "rng"}  what resuming training needs on top
  data    the grain iterator state       so a resumed run sees exactly the batches that come next
  config  the run's config as JSON       so every tool rebuilds the same model and data

Orbax writes each checkpoint into a temporary folder and renames it when complete, so an
interrupted save (even by `kill -9`) never replaces or corrupts the last good one; the next start
removes the leftover. Which steps are saved is orbax's decision (`save_policy`).

Each step also records how many processes wrote it and how many examples of the training
stream its run had used. A run with another number of processes restores the model and training
state into its own devices, and continues the data at that example instead of restoring each
process's iterator: every process's local batch k is its share of global batch k whatever their
number, so the run sees the same examples in the same order as it would have (with another
`batch_size` too, when the examples used fill whole batches of it; otherwise it refuses). Only the
order of floating-point sums across devices changes.

One run at a time writes a workdir: `hold_workdir` locks WORKDIR/run.lock for the run's life.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import grain.checkpoint as grain_checkpoint
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dmjax import config as config_lib
from dmjax import errors

ITEMS = ("model", "train", "data", "config")
PROCESS_COUNT_KEY = "dmjax_process_count"  # In each step's custom metadata.
EXAMPLES_SEEN_KEY = "dmjax_examples_seen"  # Also: training examples used up to the step.
LOCK_FILE = "run.lock"


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
         train=None, data_iterator=None, examples_seen: int | None = None,
         force: bool = False) -> bool:
  """Saves `step` (asynchronously) if the manager's policy, or `force`, says so; returns whether
  it did. Every process must call it with the same arguments. `examples_seen`: how many examples
  of the training stream the run has used up to `step` (see `continue_data`)."""
  items = {"model": ocp.args.StandardSave(model),
           "config": ocp.args.JsonSave(json.loads(config.to_json()))}
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  if data_iterator is not None:
    items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
  # The number of processes that wrote the data iterator states: another number resumes by
  # position instead (see `restore`).
  custom = {PROCESS_COUNT_KEY: jax.process_count()}
  if examples_seen is not None:
    custom[EXAMPLES_SEEN_KEY] = int(examples_seen)
  return manager.save(step, args=ocp.args.Composite(**items), force=force,
                      custom_metadata=custom)


def saved_process_count(manager: ocp.CheckpointManager, step: int) -> int | None:
  """How many processes wrote `step`, or None for checkpoints that do not say (older ones)."""
  custom = manager.metadata(step).custom_metadata or {}
  return custom.get(PROCESS_COUNT_KEY)


def examples_seen(manager: ocp.CheckpointManager, step: int) -> int:
  """How many examples of the training stream the run that saved `step` had used: recorded, or
  for checkpoints that do not say, `step` batches of the batch size they were saved with."""
  custom = manager.metadata(step).custom_metadata or {}
  if EXAMPLES_SEEN_KEY in custom:
    return int(custom[EXAMPLES_SEEN_KEY])
  return step * restore_config(manager, step).batch_size


def continue_data(manager: ocp.CheckpointManager, step: int, iterator, *,
                  batch_size: int) -> int:
  """Moves a training iterator (`seek(global_batch)`) to the first example the run that saved
  `step` had not used, in global batches of `batch_size`; returns that batch's number.

  For a run that cannot restore the iterators' states (another number of processes). When the
  examples used do not fill whole batches of `batch_size`, continuing would skip or repeat some:
  that is refused in one line.
  """
  seen = examples_seen(manager, step)
  if seen % batch_size:
    raise errors.UserError(
        f"checkpoint {manager.directory}/{step}: its run had used {seen} training examples, "
        f"which is not a whole number of batches of config.batch_size={batch_size}; resuming "
        "would skip or repeat examples, so resume with a batch_size that divides it (such as "
        f"the run's own, {restore_config(manager, step).batch_size})")
  iterator.seek(seen // batch_size)
  return seen // batch_size


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


def _read_holder(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip() or "a process that has not said who it is"
  except OSError:
    return "an unknown process"


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/run.lock while the block runs, so that a second run of the same workdir (a
  requeued or duplicate job that overlaps a live one) refuses in one line instead of deleting
  the live run's save in progress and writing steps beside it.

  An OS lock (`flock`): the OS releases it when the holder ends, even by `kill -9`; NFS clients
  forward it to the server, so it holds across hosts. Process 0 takes it for a multi-process run
  and tells the others (every process must call this). A filesystem without locks (Lustre
  mounted without `flock`, some FUSE mounts) is warned about and run without one.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  fd, acquired = None, True
  if jax.process_index() == 0:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
        acquired = False
      else:
        logging.warning("%s: cannot be locked (%s); nothing stops a second run of this workdir.",
                        path, os.strerror(e.errno))
    if acquired:
      os.ftruncate(fd, 0)
      os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    acquired = bool(multihost_utils.broadcast_one_to_all(np.int32(acquired)))
  try:
    if not acquired:
      raise errors.UserError(f"{workdir} is in use by another run ({_read_holder(path)} holds "
                             f"{path}); wait for it to end or stop it, or choose another workdir")
    yield
  finally:
    if fd is not None:
      os.close(fd)  # Releases the lock.
