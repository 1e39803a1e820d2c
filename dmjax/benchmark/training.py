"""Rows of training: the step (beside PyTorch), on-device augmentation, the step fed by the
pipeline, the pipeline alone, the largest batch, and the renderer."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np

from dmjax import models, parallel, train
from dmjax.benchmark import flops, timing, torch_side
from dmjax.benchmark.settings import Settings
from dmjax.data import augment, pipeline, synthetic


def random_batch(batch_size: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch of the pipeline's shapes and dtypes (values only need to be plausible)."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, resolution, resolution)
  return {"bg": rng.standard_normal((*shape, 3), np.float32),
          "fg_bg": rng.standard_normal((*shape, 3), np.float32),
          "mask": (rng.random((*shape, 1)) < 0.1).astype(np.float32),
          "depth": rng.random((*shape, 1), np.float32)}


def transfer_resolution(config: ml_collections.ConfigDict) -> int:
  """The side of the stored examples the host sends (dmjax.data.augment)."""
  if config.data.transfer_resolution:
    return config.data.transfer_resolution
  if config.data.source == "synthetic":
    return config.data.synthetic.resolution
  return config.data.resolution + config.data.resolution // 4


def random_stored_batch(batch_size: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch as the host sends it (dmjax.data.schema's stored format)."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, resolution, resolution)
  return {"bg": rng.integers(0, 256, (*shape, 3), np.uint8),
          "fg_bg": rng.integers(0, 256, (*shape, 3), np.uint8),
          "mask": np.where(rng.random((*shape, 1)) < 0.1, 255, 0).astype(np.uint8),
          "depth": rng.integers(0, 65536, (*shape, 1), np.uint16)}


def training_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
  """A random batch of what `config`'s train step takes."""
  return random_stored_batch(batch_size, transfer_resolution(config))


class JaxTrainer:
  """A config's training step (`train.make_train_step`), compiled once, on a resident batch.

  `run(n)` dispatches n steps without waiting in between (the state is donated from one to the
  next, as in training) and waits for the last; with `batches` (global arrays, e.g. from
  `parallel.DevicePrefetcher`), each step takes the next one instead, as training does.
  """

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray], *,
               augment_in_step: bool = True):
    mesh = parallel.create_mesh()
    model = models.create_model(config.model)
    tx = train.create_optimizer(config)
    self.sharding = parallel.batch_sharding(mesh)
    self._state = jax.device_put(
        train.create_train_state(config, model, tx, jax.random.PRNGKey(config.seed)),
        parallel.replicated(mesh))
    self.batch = parallel.to_global(batch, self.sharding)
    # Without augment_in_step the batch is model inputs already (as the PyTorch side gets them).
    preprocess = augment.make_preprocess(config) if augment_in_step else None
    step = train.make_train_step(model, tx, config.loss, mesh, preprocess)
    self.compiled = step.lower(self._state, self.batch).compile()
    self.batch_size = config.batch_size

  def run(self, steps: int, batches: Iterator[dict[str, jax.Array]] | None = None) -> None:
    state = self._state
    for _ in range(steps):
      state, _ = self.compiled(state, self.batch if batches is None else next(batches))
    self._state = jax.block_until_ready(state)

  def fields(self) -> timing.Row:
    flops_per_step = flops.compiled_flops(self.compiled)
    return {"flops_per_image": None if flops_per_step is None else flops_per_step / self.batch_size,
            "program_memory_mb": timing.program_memory_mb(self.compiled)}


def compare_config(config: ml_collections.ConfigDict, model_name: str,
                   dtype: str) -> ml_collections.ConfigDict:
  """The config's stage with `model_name`, trained with the PyTorch side's loss and optimizer."""
  config = config.copy_and_resolve_references()
  if config.model.get("refiner", False):  # The bare model at its own size, as PyTorch runs it.
    config.model.refiner = False
    config.data.resolution //= 2
  config.model.name = model_name
  config.model.dtype = dtype
  config.loss.update(torch_side.COMPARE_LOSS)
  config.optimizer.update(torch_side.COMPARE_OPTIMIZER)
  return config


@functools.cache
def _peak_flops(dtype: str) -> tuple[float, str]:
  return flops.peak_flops(jax.devices()[0], dtype)


def efficiency_fields(flops_per_image: float | None, images_per_sec: float,
                      dtype: str) -> timing.Row:
  if flops_per_image is None:
    return {"flops_per_image": None}
  peak, source = _peak_flops("bfloat16" if dtype.startswith("bfloat16") else "float32")
  achieved = flops_per_image * images_per_sec
  return {"flops_per_image": round(flops_per_image), "achieved_tflops": round(achieved / 1e12, 4),
          "peak_tflops": round(peak / 1e12, 3), "peak_source": source,
          "fraction_of_peak": round(achieved / peak, 4)}


def measure_step(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  # The compare and PyTorch rows run the bare model at its own size (compare_config).
  compare_resolution = compare_config(config, config.model.name,
                                      config.model.dtype).data.resolution
  batch = random_batch(config.batch_size, compare_resolution)
  runners = []
  trainer = JaxTrainer(config, training_batch(config, config.batch_size))
  runners.append(timing.Runner("configured", trainer.run, trainer.batch_size, {
      "framework": "jax", "model": config.model.name, "variant": "configured", "loss": "config",
      "optimizer": config.optimizer.name, "dtype": config.model.dtype,
      **trainer.fields()}))
  compare_names = []
  dtypes = settings.dtypes or [config.model.dtype]
  for model_name, dtype in itertools.product(settings.models, dtypes):
    if settings.compare_recipe == "config":
      model_config = config.copy_and_resolve_references()
      model_config.model.update(name=model_name, dtype=dtype)
      trainer = JaxTrainer(model_config, training_batch(model_config, config.batch_size))
      recipe = {"loss": "config", "optimizer": config.optimizer.name}
    else:
      trainer = JaxTrainer(compare_config(config, model_name, dtype), batch,
                           augment_in_step=False)
      recipe = {"loss": "bce_dice", "optimizer": "sgd"}
    compare_names.append(f"{model_name}:{dtype}")
    runners.append(timing.Runner(compare_names[-1], trainer.run, trainer.batch_size, {
        "framework": "jax", "model": model_name, "variant": "compare", **recipe, "dtype": dtype,
        **trainer.fields()}))
  torch_runners, notes = torch_side.torch_runners(
      batch, torch_on=settings.torch, variants=settings.torch_variants,
      compile=settings.torch_compile)
  # The PyTorch model is the seed: charge it the XLA FLOPs of dmjax's seed model, so that both
  # sides' fractions of peak are of the same count.
  seed_flops = next((r.row["flops_per_image"] for r in runners if r.row["model"] == "depthmasknet"
                     and r.row["variant"] == "compare"), None)
  for runner in torch_runners:
    runner.row["flops_per_image"] = seed_flops
  runners += torch_runners

  rates = timing.interleaved_rates(runners, repeats=settings.repeats,
                                   repeat_seconds=settings.repeat_seconds)
  for runner in runners:
    resolution = config.data.resolution if runner.name == "configured" else compare_resolution
    row = {"what": "step", "resolution": resolution, **runner.row,
           **timing.rate_fields(rates[runner.name])}
    row.update(efficiency_fields(row.pop("flops_per_image"), row["images_per_sec"],
                                  row["dtype"]))
    if runner.name in compare_names:
      for torch_runner in torch_runners:
        row[f"ratio_to_{torch_runner.name}"] = timing.median_ratio(rates[runner.name],
                                                             rates[torch_runner.name])
    yield row
  yield from notes


PIPELINE_MODES = {  # --pipeline_modes: data.predecoded (the step augments either way)
    "decoded": False,  # decode and gather
    "predecoded": True,  # gather from arrays predecoded once
}


def _pipeline_config(config: ml_collections.ConfigDict, settings: Settings, resolution: int,
                     num_workers: int, mode: str | None = None) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.data.resolution = resolution
  config.data.num_workers = num_workers
  if mode is not None:
    config.data.predecoded = PIPELINE_MODES[mode]
    config.data.transfer_resolution = 0  # As rendered, below.
  if config.data.source == "synthetic":
    # The size the stage configs render at for this input size (dmjax.config.stage_config), on
    # a dataset just big enough that several hundred batches cycle through it.
    config.data.synthetic.resolution = resolution + resolution // 4
    config.data.synthetic.num_train = settings.pipeline_examples
    config.data.synthetic.num_test = 8
  return config


def _train_iterator(config: ml_collections.ConfigDict) -> pipeline.TrainIterator:
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is for rows.
    pipeline.prepare(config)
  return pipeline.create_train_iterator(config, process_index=0, process_count=1)


def measure_e2e(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  for mode in settings.e2e_modes or [None]:
    run_config = _pipeline_config(config, settings, config.data.resolution,
                                  config.data.num_workers, mode)
    iterator = _train_iterator(run_config)
    try:
      trainer = JaxTrainer(run_config, next(iterator))
      resident = timing.Runner("step", trainer.run, trainer.batch_size)
      # Fed as training feeds it: the next batches already on their way to the devices.
      batches = parallel.DevicePrefetcher(iterator, trainer.sharding)
      fed = timing.Runner("e2e", functools.partial(trainer.run, batches=batches),
                          trainer.batch_size)
      rates = timing.interleaved_rates([resident, fed], repeats=settings.repeats,
                                       repeat_seconds=settings.repeat_seconds)
    finally:
      iterator.close()
    yield {"what": "e2e", "model": config.model.name, "resolution": config.data.resolution,
           "num_workers": run_config.data.num_workers, **timing.rate_fields(rates["e2e"]),
           "step_images_per_sec": round(statistics.median(rates["step"]), 2),
           "e2e_over_step": timing.median_ratio(rates["e2e"], rates["step"]),
           "augment": bool(run_config.data.augment.enabled),
           "predecoded": bool(run_config.data.predecoded),
           "program_memory_mb": timing.program_memory_mb(trainer.compiled)}


def measure_pipeline(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  for resolution, mode, num_workers in itertools.product(
      map(int, settings.pipeline_resolutions), settings.pipeline_modes,
      map(int, settings.pipeline_workers)):
    run_config = _pipeline_config(config, settings, resolution, num_workers, mode)
    iterator = _train_iterator(run_config)
    try:
      for _ in range(settings.warmup_batches):
        next(iterator)
      rate, batches = timing.timed_rate(lambda it=iterator: len(next(it)["bg"]),
                                  seconds=settings.seconds, max_steps=settings.max_batches)
    finally:
      iterator.close()
    yield {"what": "pipeline", "images_per_sec": round(rate, 1),
           "batch_size": run_config.batch_size, "num_workers": num_workers,
           "resolution": resolution, "mode": mode,
           "source_resolution": (run_config.data.synthetic.resolution
                                 if run_config.data.source == "synthetic" else None),
           "augment": bool(run_config.data.augment.enabled), "batches": batches}


def measure_augment(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  """`dmjax.data.augment` alone: what augmenting in the train step adds to it."""
  run_config = config.copy_and_resolve_references()
  mesh = parallel.create_mesh()
  sharding = parallel.batch_sharding(mesh)
  augment_batch = jax.jit(augment.make_preprocess(run_config),
                          in_shardings=(sharding, None, None), out_shardings=sharding)
  size = transfer_resolution(run_config)
  batch = parallel.to_global(random_stored_batch(config.batch_size, size), sharding)
  key = jax.random.PRNGKey(0)
  compiled = augment_batch.lower(batch, key, 0).compile()

  def run(calls: int) -> None:
    jax.block_until_ready([compiled(batch, key, step) for step in range(calls)])

  rates = timing.interleaved_rates([timing.Runner("augment", run, config.batch_size)],
                                   repeats=settings.repeats,
                                   repeat_seconds=settings.repeat_seconds)["augment"]
  yield {"what": "augment", "resolution": config.data.resolution, "source_resolution": size,
         "augment": bool(config.data.augment.enabled), **timing.rate_fields(rates),
         "program_memory_mb": timing.program_memory_mb(compiled)}


def _is_out_of_memory(error: Exception) -> bool:
  message = str(error)
  return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def _fits(config: ml_collections.ConfigDict, batch_size: int) -> bool:
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  try:
    JaxTrainer(config, training_batch(config, batch_size)).run(1)
  except Exception as error:  # noqa: BLE001 -- XLA raises its own runtime error types.
    if _is_out_of_memory(error):
      return False
    raise
  return True


def largest_fitting_batch(fits: Callable[[int], bool], start: int, multiple: int) -> tuple[int,
                                                                                          int]:
  """(largest batch that fits, smallest that failed), to within 1/32 of the former.

  Doubles from `start` until a batch fails (or halves it until one fits), then bisects; batches
  stay multiples of `multiple` (the device count). Raises if `multiple` itself does not fit.
  """
  good = start
  if fits(good):
    bad = 2 * good
    while fits(bad):
      good, bad = bad, 2 * bad
  else:
    while True:
      if good == multiple:
        raise ValueError(f"batch {multiple} does not fit")
      bad, good = good, max(multiple, good // 2 // multiple * multiple)
      if fits(good):
        break
  while bad - good > max(multiple, good // 32):
    middle = (good + bad) // 2 // multiple * multiple
    good, bad = (middle, bad) if fits(middle) else (good, middle)
  return good, bad


def _program_bytes(config: ml_collections.ConfigDict, batch_size: int) -> float:
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  compiled = JaxTrainer(config, training_batch(config, batch_size)).compiled
  return timing.program_memory_mb(compiled) * timing.MiB


def measure_max_batch(config: ml_collections.ConfigDict,
                      settings: Settings) -> Iterable[timing.Row]:
  run_config = config.copy_and_resolve_references()
  run_config.data.resolution = settings.max_batch_resolution
  stats = jax.devices()[0].memory_stats() or {}
  row = {"what": "max_batch", "images_per_sec": None, "model": config.model.name,
         "resolution": run_config.data.resolution}
  if "bytes_limit" in stats:
    # From the config's own batch, a multiple of the device count: every try is a compile.
    good, bad = largest_fitting_batch(functools.partial(_fits, run_config),
                                      start=run_config.batch_size, multiple=jax.device_count())
    yield {**row, "max_batch": good, "first_failed_batch": bad,
           "memory_limit_mb": round(stats["bytes_limit"] / timing.MiB)}
    return
  # No device memory limit (CPU): memory is linear in the batch, so two compiled programs give
  # the slope; nothing is run, so the host (shared) is not pushed into swapping.
  small, large = 8, 16
  small_bytes, large_bytes = _program_bytes(run_config, small), _program_bytes(run_config, large)
  per_image = (large_bytes - small_bytes) / (large - small)
  host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  yield {**row, "max_batch": None,
         "estimated_max_batch": int((host_bytes - (small_bytes - small * per_image)) // per_image),
         "program_mb_per_image": round(per_image / timing.MiB, 2),
         "memory_limit_mb": round(host_bytes / timing.MiB),
         "note": "estimate against the host's physical memory from XLA's memory analysis"}


def measure_render(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  seed = config.data.synthetic.seed
  num_rooms = synthetic.NUM_ROOMS["train"]

  def renderer(resolution: int, first_index: int) -> Callable[[], int]:
    indices = itertools.count(first_index)

    def render() -> int:
      synthetic.render_example("train", next(indices), resolution=resolution, seed=seed)
      return 1
    return render

  for resolution in map(int, settings.render_resolutions):
    # Examples k and k + num_rooms share a room: the first pass renders a room per example, the
    # second only composites into the rooms the first one left in the cache.
    cold_rate, count = timing.timed_rate(renderer(resolution, 0), seconds=settings.seconds,
                                   max_steps=num_rooms)
    warm_rate, _ = timing.timed_rate(renderer(resolution, num_rooms), seconds=settings.seconds,
                               max_steps=count)
    yield {"what": "render", "images_per_sec": round(warm_rate, 2),
           "cold_images_per_sec": round(cold_rate, 2), "batch_size": 1,
           "resolution": resolution, "examples": count}
