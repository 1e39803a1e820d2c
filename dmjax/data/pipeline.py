"""The grain input pipeline: training batches, evaluation batches, and building the data.

Training batches: the host only gathers. Global batch k is positions [k·B, (k+1)·B) of an
endless stream that visits the training examples in a new order each epoch (numpy permutations
of (config.seed, epoch)); every JAX process takes its slice of each global batch. Examples leave
as stored (uint8 photos and mask, uint16 depth) at `data.transfer_resolution`; the train step
augments, resizes and normalises them (`dmjax.data.augment`), so batches depend neither on the
number of worker processes nor on the number of JAX processes. `data.predecoded` decodes the
split once into memory-mapped arrays next to the built dataset, so that gathering is a copy
(what feeds a GPU at small resolutions).

The batched stream is random-access, so an iterator's state is just the number of batches it has
handed out; restoring rebuilds the stream from there (with any worker count).

Evaluation batches are made on the host: each example's whole frame resized to
`data.resolution` with PIL and normalised, no augmentation (`prepare_eval_example`).

Reading needs neither TensorFlow nor the builder's inputs, only the built ArrayRecord files;
building (`prepare`) renders or reads the sources once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from dmjax import errors, progress
from dmjax.data import schema, sources, tfds_builder


def prepare(config: ml_collections.ConfigDict) -> None:
  """Builds the dataset `config.data` names, and predecodes its training split if the config
  trains from predecoded arrays, unless that is done already (shows progress).

  Every process of a run calls it. Whichever takes the dataset's lock first (a file lock beside
  the built datasets) does the work; the others wait for the lock, then find it done. So the data
  is built once per host, or once for all hosts where they share the folder, and one process at
  a time writes there (what the disk check of `predecode` counts on). On a file system without
  locks, every process builds alone (TFDS and `predecode` rename complete work into place).
  """
  source = sources.get_source(config)
  built_here = False
  # Built already: nothing to lock (the data may be on a read-only disk, or built elsewhere).
  if not source.builder.is_prepared():
    with _build_lock(source):
      if not source.builder.is_prepared():  # Nor by another process while this one waited.
        logging.info("Building %s in %s.", source.name, source.builder.data_dir)
        # The builders report progress with an ETA (dmjax.progress); TFDS's own bars know no
        # total and would fight them for the terminal's line.
        tfds.display_progress_bar(False)
        source.builder.download_and_prepare(file_format="array_record",
                                            download_config=source.download_config)
        built_here = True
  if not built_here:
    # Perhaps built by another process after this one made its builder, which then describes
    # no splits: a new builder reads what is there.
    sources.get_source(config, reload=True)
  if config.data.predecoded:
    predecode(config, "train")


@contextlib.contextmanager
def _build_lock(source: sources.Source):
  """Holds the exclusive lock on building `source`, for every process of every run that uses
  the same data folder; yields whether it got it. An flock: the kernel releases it when its
  holder dies, even by kill -9. Ask for it only when there is something to build: a lock file
  that cannot be made (a read-only folder) is then no error of its own, and building says what
  is wrong."""
  root = os.fspath(source.builder.data_dir_root)
  path = os.path.join(root, f".{source.name.replace('/', '-')}.lock")
  try:
    os.makedirs(root, exist_ok=True)
    lock_file = open(path, "a")  # noqa: SIM115  (closed below, after the yield)
  except OSError as e:
    logging.warning("Cannot open the lock %s (%s); building without a lock.", path, e)
    yield False
    return
  with lock_file:
    locked = True
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("Waiting for another process to build %s (it holds %s).", source.name, path)
      fcntl.flock(lock_file, fcntl.LOCK_EX)
    except OSError as e:  # A file system without locks: every process builds its own copy.
      logging.warning("Cannot lock %s (%s); building without a lock.", path, e)
      locked = False
    try:
      yield locked
    finally:
      if locked:
        fcntl.flock(lock_file, fcntl.LOCK_UN)


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  source = _built_source(config, split)
  return source.builder.info.splits[split].num_examples


def denormalize(batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """(bg, fg_bg) of a batch back in [0, 1], e.g. for image grids and the baselines."""
  return (schema.denormalize_photo(batch["bg"], "bg"),
          schema.denormalize_photo(batch["fg_bg"], "fg_bg"))


def create_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """An endless iterator of this process's training batches, checkpointable with grain's
  CheckpointHandler (`get_state()` → bytes, `set_state(bytes)`, `start_prefetch()`).

  Batches of stored examples (dmjax.data.schema): `bg`, `fg_bg` uint8 (b, S, S, 3), `mask` uint8
  and `depth` uint16 (b, S, S, 1); b = batch_size / process_count, S = data.transfer_resolution
  (0: as stored). The train step makes model inputs of them (`dmjax.data.augment`).
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch_size = _local_batch_size(config.batch_size, process_count, "config.batch_size")
  source = _built_source(config, "train")
  identity = {"dataset": source.name, "seed": config.seed, "batch_size": local_batch_size,
              "process_index": process_index, "process_count": process_count,
              "transfer_resolution": config.data.transfer_resolution}
  examples = (PredecodedExamples(predecode(config, "train")) if config.data.predecoded
              else DecodedExamples(_data_source(source, "train"), config.data.transfer_resolution))
  batches = grain.MapDataset.range(_ENDLESS).map(StoredBatch(
      examples, seed=config.seed, global_batch_size=config.batch_size,
      local_batch_size=local_batch_size, process_index=process_index))
  return TrainIterator(batches, identity, num_workers=config.data.num_workers,
                       prefetch=config.data.prefetch)


def _num_eval_examples(data_source, num_examples: int) -> int:
  return len(data_source) if num_examples < 0 else min(num_examples, len(data_source))


def num_eval_batches(config: ml_collections.ConfigDict, split: str, num_examples: int = -1,
                     batch_size: int | None = None) -> int:
  """How many batches `create_eval_batches` gives with the same arguments."""
  data_source = _data_source(_built_source(config, split), split)
  return math.ceil(_num_eval_examples(data_source, num_examples)
                   / (batch_size or config.eval_batch_size))


def create_eval_batches(config: ml_collections.ConfigDict, split: str, num_examples: int = -1,
                        batch_size: int | None = None, *, process_index: int | None = None,
                        process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches of the first `num_examples` (-1: all) examples of `split`, in order.

  No augmentation; resized and normalised like training. Global batch k holds examples
  [k·B, (k+1)·B), process p its p-th slice of B / process_count. Every batch carries
  `example_weight` (b,) float32: 1 for real examples, 0 for the padding (copies of the last
  example) that fills the last batch, so all processes yield the same number of batches.
  """
  process_index, process_count = _process(process_index, process_count)
  global_batch_size = batch_size or config.eval_batch_size
  local_batch_size = _local_batch_size(global_batch_size, process_count,
                                       "the evaluation batch size")
  data_source = _data_source(_built_source(config, split), split)
  total = _num_eval_examples(data_source, num_examples)
  num_batches = math.ceil(total / global_batch_size)
  slots = grain.MapDataset.range(num_batches * local_batch_size)
  slots = slots.map(_EvalSlot(data_source, total, global_batch_size, local_batch_size,
                              process_index))
  examples = slots.map(DecodeAndPrepareEvalExample(
      resolution=int(config.data.resolution), binarize_mask=bool(config.data.binarize_mask)))
  batches = examples.batch(local_batch_size)
  return iter(batches.to_iter_dataset(_read_options(config.data.prefetch)))


def prepare_eval_example(example: dict[str, np.ndarray], resolution: int,
                         binarize_mask: bool) -> dict[str, np.ndarray]:
  """A stored-format example → model inputs at (R, R), without augmentation: the photos
  normalised float32 (dmjax.data.schema), the mask and depth float32 (R, R, 1) in [0, 1], the
  mask thresholded at 0.5 if `binarize_mask`.

  The photos are resized as uint8 (the precision they came in), the mask and depth as floats,
  so the uint16 depth codes keep their precision and the mask its soft edges until thresholded.
  """
  def resize(image):
    return schema.resize_whole_frame(image, resolution, resolution)

  out = {key: schema.normalize_photo(resize(example[key]), key) for key in schema.IMAGE_KEYS}
  mask = example["mask"].astype(np.float32) / 255.0
  depth = example["depth"].astype(np.float32) / schema.DEPTH_MAX_CODE
  for key, label in (("mask", mask), ("depth", depth)):
    # Bilinear weights are convex, so only float rounding can leave [0, 1].
    out[key] = np.clip(resize(label), 0.0, 1.0)
  if binarize_mask:
    out["mask"] = (out["mask"] > 0.5).astype(np.float32)
  return out


_ENDLESS = sys.maxsize  # Batches in the training stream: it never runs out.


class DecodedExamples:
  """Training examples as stored, decoded from the built dataset as they are gathered."""

  def __init__(self, data_source, transfer_resolution: int):
    self._data_source = data_source
    self._resolution = int(transfer_resolution)

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = tfds_builder.decode_example(self._data_source[int(index)])
    if self._resolution:
      example = resize_stored(example, self._resolution)
    return example

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self[i] for i in indices]
    shapes = {example["fg_bg"].shape for example in examples}
    if len(shapes) > 1:
      raise errors.UserError(f"training examples differ in size ({sorted(shapes)}); set "
                             "config.data.transfer_resolution so the host can batch them")
    return {key: np.stack([example[key] for example in examples]) for key in schema.KEYS}


class PredecodedExamples:
  """Training examples as stored, from the arrays `predecode` wrote (memory-mapped, so the
  processes of one host share the page cache)."""

  def __init__(self, directory: str):
    self._directory = directory
    self._arrays = None  # Opened on first use, in whichever (worker) process uses them.

  def __getstate__(self):
    return {"_directory": self._directory, "_arrays": None}

  def _open(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = {key: np.load(os.path.join(self._directory, key + ".npy"), mmap_mode="r")
                      for key in schema.KEYS}
    return self._arrays

  def __len__(self) -> int:
    return len(self._open()["fg_bg"])

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {key: array[indices] for key, array in self._open().items()}


def resize_stored(example: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
  """A stored-format example resized (whole frame, PIL bilinear) to (R, R), still stored format."""
  return {key: schema.resize_whole_frame(example[key], resolution, resolution).astype(
      example[key].dtype, copy=False) for key in schema.KEYS}


@dataclasses.dataclass
class StoredBatch(grain.transforms.Map):
  """Global batch number k → this process's share of it, as stored.

  Global batch k is positions [k·B, (k+1)·B) of the stream that visits every example once per
  epoch, epoch e in the order of a permutation drawn from (seed, e); process p takes its p-th
  slice of B / process_count.
  """

  examples: DecodedExamples | PredecodedExamples
  seed: int
  global_batch_size: int
  local_batch_size: int
  process_index: int

  def __post_init__(self):
    self._orders: dict[int, np.ndarray] = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_orders"}

  def __setstate__(self, state):
    self.__dict__.update(state, _orders={})

  def order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 2:  # Batches cross at most one epoch boundary.
        self._orders.pop(min(self._orders))
      rng = np.random.default_rng([self.seed, epoch])
      self._orders[epoch] = rng.permutation(len(self.examples))
    return self._orders[epoch]

  def map(self, batch_index: int) -> dict[str, np.ndarray]:
    first = batch_index * self.global_batch_size + self.process_index * self.local_batch_size
    epochs, offsets = np.divmod(np.arange(first, first + self.local_batch_size),
                                len(self.examples))
    indices = np.empty_like(offsets)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      indices[here] = self.order(int(epoch))[offsets[here]]
    return self.examples.gather(indices)


def predecoded_dir(config: ml_collections.ConfigDict, split: str) -> str:
  source = _built_source(config, split)
  size = config.data.transfer_resolution or "stored"
  return os.path.join(source.builder.data_dir, f"predecoded_{split}_r{size}")


def predecode(config: ml_collections.ConfigDict, split: str) -> str:
  """Decodes `split` once into one .npy array per key (stored format, resized to
  `data.transfer_resolution` if set) next to the built dataset, unless that is done already;
  returns the directory. The arrays are written under a temporary name and renamed when
  complete, so an interrupted build leaves nothing that looks finished."""
  directory = predecoded_dir(config, split)
  if os.path.isdir(directory):
    return directory
  source = _built_source(config, split)
  with _build_lock(source) as locked:
    if not os.path.isdir(directory):  # Another process may have written it while we waited.
      _predecode(source, split, config.data.transfer_resolution, directory, locked)
  return directory


def _predecode(source: sources.Source, split: str, transfer_resolution: int, directory: str,
               locked: bool) -> None:
  if locked:  # Then partial arrays beside the directory were left by a process that died.
    for stale in glob.glob(glob.escape(directory) + ".partial-*"):
      logging.info("Removing %s, left by an interrupted predecode.", stale)
      shutil.rmtree(stale, ignore_errors=True)
  examples = DecodedExamples(_data_source(source, split), transfer_resolution)
  first = examples[0]
  # What is written: one array per key (and its header of at most a few kB), by this process
  # alone.
  size = len(examples) * sum(v.nbytes for v in first.values()) + len(first) * 4096
  free = shutil.disk_usage(os.path.dirname(directory)).free
  if size > free:
    raise errors.UserError(f"predecoding {split} to {directory} needs {size / 2**30:.1f} GiB, and "
                           f"{free / 2**30:.1f} GiB are free; lower "
                           "config.data.transfer_resolution or set config.data.predecoded=False")
  logging.info("Predecoding %d %s examples (%.1f GiB) to %s.", len(examples), split,
               size / 2**30, directory)
  partial = f"{directory}.partial-{os.getpid()}"
  try:
    os.makedirs(partial, exist_ok=True)
  except OSError as e:  # A read-only copy of the built data, say.
    raise errors.UserError(f"cannot predecode {split} to {partial} ({e.strerror or e}); make "
                           "the folder writable or set config.data.predecoded=False") from None
  try:
    _write_predecoded(examples, first, partial, split)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  try:
    os.rename(partial, directory)
  except OSError:  # Without a lock, another process may have finished the same arrays first.
    shutil.rmtree(partial, ignore_errors=True)
    if not os.path.isdir(directory):
      raise


def _write_predecoded(examples: DecodedExamples, first: dict[str, np.ndarray], directory: str,
                      split: str) -> None:
  arrays = {key: np.lib.format.open_memmap(os.path.join(directory, key + ".npy"), mode="w+",
                                           dtype=value.dtype, shape=(len(examples), *value.shape))
            for key, value in first.items()}
  decoded = grain.MapDataset.source(examples).to_iter_dataset(
      grain.ReadOptions(num_threads=max(os.cpu_count() or 1, 1), prefetch_buffer_size=256))
  for index, example in enumerate(progress.track(decoded, f"predecode {split}", len(examples),
                                                unit="examples")):
    for key, array in arrays.items():
      if example[key].shape != array.shape[1:]:
        raise errors.UserError(f"{split} example {index} is {example[key].shape[:2]}, the first "
                               f"was {array.shape[1:3]}; set config.data.transfer_resolution")
      array[index] = example[key]
  for array in arrays.values():
    array.flush()


@dataclasses.dataclass(frozen=True)
class _EvalSlot(grain.transforms.Map):
  """Slot i of this process's evaluation batches → (raw example, weight)."""

  data_source: object
  total: int
  global_batch_size: int
  local_batch_size: int
  process_index: int

  def map(self, slot: int) -> tuple[dict[str, bytes], float]:
    batch, offset = divmod(int(slot), self.local_batch_size)
    index = batch * self.global_batch_size + self.process_index * self.local_batch_size + offset
    is_real = index < self.total
    return self.data_source[min(index, self.total - 1)], float(is_real)


@dataclasses.dataclass(frozen=True)
class DecodeAndPrepareEvalExample(grain.transforms.Map):
  """(raw example, weight) → `prepare_eval_example`'s model inputs and `example_weight`."""

  resolution: int
  binarize_mask: bool

  def map(self, element: tuple[dict[str, bytes], float]) -> dict[str, np.ndarray]:
    raw, weight = element
    out = prepare_eval_example(tfds_builder.decode_example(raw), self.resolution,
                               self.binarize_mask)
    out["example_weight"] = np.float32(weight)
    return out


class TrainIterator:
  """The training batches from a position on, with the position as its checkpoint state.

  The interface of grain's DataLoaderIterator (what grain.checkpoint.CheckpointHandler and
  orbax save and restore): `get_state()` returns JSON bytes, `set_state(bytes)` continues from
  there. The state also records what the stream is (dataset, seed, batch size, process), and a
  state from a different stream is refused rather than silently continued.
  """

  def __init__(self, batches: grain.MapDataset, identity: dict, *, num_workers: int,
               prefetch: int):
    self._batches = batches
    self._identity = identity
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._next_batch = 0
    self._iterator = None  # Started on first use, so set_state before it costs no workers.

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    batch = next(self._iterator)
    self._next_batch += 1
    # Worker batches arrive in shared memory that lives as long as they do; hand out plain
    # arrays so callers can keep them and get the same types with or without workers.
    return {key: np.array(value) for key, value in batch.items()}

  def _start(self) -> None:
    dataset = self._batches[self._next_batch:].to_iter_dataset(_read_options(self._prefetch))
    if self._num_workers > 0:
      _accept_grain_flag_defaults()
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._num_workers,
                                       per_worker_buffer_size=max(self._prefetch, 1)),
          worker_init_fn=_ignore_sigterm)
    self._iterator = iter(dataset)

  def start_prefetch(self) -> None:
    """Starts the workers and their prefetching now rather than at the first batch."""
    if self._iterator is None:
      self._start()
    self._iterator.start_prefetch()

  def get_state(self) -> bytes:
    return json.dumps({"next_batch": self._next_batch, **self._identity}, indent=2).encode()

  def set_state(self, state: bytes) -> None:
    restored = json.loads(state.decode() if isinstance(state, bytes) else state)
    # Before issue 14 the host could augment instead; its states lack `transfer_resolution`,
    # and those of this stream say `on_device: true`.
    if "transfer_resolution" not in restored:
      raise errors.UserError("the saved data iterator state is of the host augmentation path, "
                             "which no longer exists; start a new run from that checkpoint with "
                             "--config.init_from=WORKDIR")
    restored.pop("on_device", None)
    keys = (self._identity.keys() | restored.keys()) - {"next_batch"}
    differing = {k: (restored.get(k), self._identity.get(k)) for k in sorted(keys)
                 if restored.get(k) != self._identity.get(k)}
    if differing:
      shown = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in
                        differing.items())
      hint = _dataset_hint(str(restored.get("dataset"))) if "dataset" in differing else ""
      raise errors.UserError(f"the saved data iterator state is for a different stream ({shown})"
                             + hint)
    self.close()
    self._next_batch = int(restored["next_batch"])

  def seek(self, next_batch: int) -> None:
    """Continues from batch `next_batch` of this stream.

    Local batch k of every process is its share of global batch k, whatever the number of
    processes; so a run restored on another number of processes seeks to its step.
    """
    self.close()
    self._next_batch = int(next_batch)

  def close(self) -> None:
    """Stops the worker processes, if any."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def _dataset_hint(saved_dataset: str) -> str:
  """What to do when a run's original-layout dataset is not today's."""
  builder, _, name = saved_dataset.partition("/")
  if builder != tfds_builder.DmjaxOriginal.name:
    return ""
  if tfds_builder.is_named_by_composites(name):
    return ("; the folder's composites are not those the run trained on: bring them back, or "
            "start a new run from this one with --config.init_from=WORKDIR")
  return ("; the run trained before the original layout's splits were drawn by name and cannot "
          "continue on today's split: start a new run from it with --config.init_from=WORKDIR")


def _built_source(config: ml_collections.ConfigDict, split: str) -> sources.Source:
  source = sources.get_source(config)
  if not source.builder.is_prepared():
    raise errors.UserError(f"dataset {source.name} is not built in {source.builder.data_dir}; "
                           "call dmjax.data.pipeline.prepare(config) first (config.data.tfds_dir "
                           "says where)")
  if split not in source.builder.info.splits:
    raise errors.UserError(f"dataset {source.name} has no split {split!r}; it has "
                           f"{sorted(source.builder.info.splits)}")
  return source


def _data_source(source: sources.Source, split: str):
  return source.builder.as_data_source(split, decoders=tfds_builder.RAW_DECODERS)


def _read_options(prefetch: int) -> grain.ReadOptions:
  # Grain's default keeps 500 elements ready; ours are whole batches, so keep `prefetch`, made by
  # as many threads (PIL decodes and resizes outside the GIL).
  return grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=max(prefetch, 1))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Here, not at the top: grain workers import this module and need no JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise errors.UserError(f"process_index={process_index} is not in [0, {process_count})")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int, what: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise errors.UserError(f"{what}={global_batch_size} is not a positive multiple of the "
                           f"{process_count} JAX processes")
  return global_batch_size // process_count


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """In each grain worker: SIGTERM is for the main process, which saves a checkpoint on it (see
  dmjax.preemption) and needs its workers for the batches until then. Clusters send it to every
  process of a job, workers included; the main process stops them when it is done."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _accept_grain_flag_defaults() -> None:
  # Grain reads its absl flags when it starts worker processes; outside an absl app (tests,
  # notebooks) they are unparsed and reading them raises, so take their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
