"""Throughput measurements, one JSON line per measurement on stdout.

  python -m dmjax.benchmark --config=configs/r64.py --what=pipeline,render

Every line has `what`, `images_per_sec` (quartets per second), `device`, `jax_version`,
`config`, `batch_size` and `dtype`, plus what the measurement varies. Measurements live in
`MEASUREMENTS`, {what: function(config) -> iterable of rows}; add new ones there.

  pipeline  the grain training pipeline alone (decode, joint augmentation, resize, normalise,
            batch) at 64 and 192 px with 0, 1 and 2 worker processes, over a small dataset built
            for the purpose (rendered at the size that stage's config renders at)
  render    the synthetic renderer alone at 80 and 192 px: `images_per_sec` once the example's
            room is rendered (what a long build mostly does), `cold_images_per_sec` when every
            example needs a new room

This module must not import TensorFlow: it runs on the accelerator machines, which have none.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from dmjax.data import pipeline, synthetic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=False)
_WHAT = flags.DEFINE_list("what", ["pipeline", "render"], "Measurements to run, in order.")
_PIPELINE_RESOLUTIONS = flags.DEFINE_list("pipeline_resolutions", ["64", "192"],
                                          "Model input sizes to measure the pipeline at.")
_PIPELINE_WORKERS = flags.DEFINE_list("pipeline_workers", ["0", "1", "2"],
                                      "grain worker-process counts to measure.")
_PIPELINE_EXAMPLES = flags.DEFINE_integer(
    "pipeline_examples", 512, "Training examples in the dataset built for the pipeline rows.")
_RENDER_RESOLUTIONS = flags.DEFINE_list("render_resolutions", ["80", "192"],
                                        "Render sizes to measure the renderer at.")
_SECONDS = flags.DEFINE_float("seconds", 10.0,
                              "Time per measurement, after warm-up (or --max_batches first).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 400, "Most batches per pipeline measurement.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 5,
                                       "Batches not timed (worker start-up, first reads).")

Row = dict


def _timed_rate(step: Callable[[], int], *, seconds: float, max_steps: int) -> tuple[float, int]:
  """(items per second, steps) of calling `step` (returns items made) for `seconds`."""
  items, steps = 0, 0
  start = time.perf_counter()
  while steps < max_steps:
    items += step()
    steps += 1
    if time.perf_counter() - start >= seconds:
      break
  return items / (time.perf_counter() - start), steps


def _pipeline_config(config: ml_collections.ConfigDict, resolution: int,
                     num_workers: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.data.resolution = resolution
  config.data.num_workers = num_workers
  if config.data.source == "synthetic":
    # The size the stage configs render at for this input size (dmjax.config.stage_config), on
    # a dataset just big enough that several hundred batches cycle through it.
    config.data.synthetic.resolution = resolution + resolution // 4
    config.data.synthetic.num_train = _PIPELINE_EXAMPLES.value
    config.data.synthetic.num_test = 8
  return config


def measure_pipeline(config: ml_collections.ConfigDict) -> Iterable[Row]:
  for resolution in map(int, _PIPELINE_RESOLUTIONS.value):
    for num_workers in map(int, _PIPELINE_WORKERS.value):
      run_config = _pipeline_config(config, resolution, num_workers)
      with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is for rows.
        pipeline.prepare(run_config)
      iterator = pipeline.create_train_iterator(run_config, process_index=0, process_count=1)
      try:
        for _ in range(_WARMUP_BATCHES.value):
          next(iterator)
        rate, batches = _timed_rate(lambda it=iterator: len(next(it)["bg"]),
                                    seconds=_SECONDS.value, max_steps=_MAX_BATCHES.value)
      finally:
        iterator.close()
      yield {"what": "pipeline", "images_per_sec": round(rate, 1),
             "batch_size": run_config.batch_size, "num_workers": num_workers,
             "resolution": resolution,
             "source_resolution": (run_config.data.synthetic.resolution
                                   if run_config.data.source == "synthetic" else None),
             "augment": bool(run_config.data.augment.enabled), "batches": batches}


def measure_render(config: ml_collections.ConfigDict) -> Iterable[Row]:
  seed = config.data.synthetic.seed
  num_rooms = synthetic.NUM_ROOMS["train"]

  def renderer(resolution: int, first_index: int) -> Callable[[], int]:
    indices = itertools.count(first_index)

    def render() -> int:
      synthetic.render_example("train", next(indices), resolution=resolution, seed=seed)
      return 1
    return render

  for resolution in map(int, _RENDER_RESOLUTIONS.value):
    # Examples k and k + num_rooms share a room: the first pass renders a room per example, the
    # second only composites into the rooms the first one left in the cache.
    cold_rate, count = _timed_rate(renderer(resolution, 0), seconds=_SECONDS.value,
                                   max_steps=num_rooms)
    warm_rate, _ = _timed_rate(renderer(resolution, num_rooms), seconds=_SECONDS.value,
                               max_steps=count)
    yield {"what": "render", "images_per_sec": round(warm_rate, 2),
           "cold_images_per_sec": round(cold_rate, 2), "batch_size": 1,
           "resolution": resolution, "examples": count}


MEASUREMENTS: dict[str, Callable[[ml_collections.ConfigDict], Iterable[Row]]] = {
    "pipeline": measure_pipeline,
    "render": measure_render,
}


def _common_fields(config: ml_collections.ConfigDict) -> Row:
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}", "host_cpus": os.cpu_count(),
          "jax_version": jax.__version__,
          "config": config_flags.get_config_filename(flags.FLAGS["config"]),
          "batch_size": config.batch_size, "dtype": config.model.dtype}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [what for what in _WHAT.value if what not in MEASUREMENTS]
  if unknown:
    raise app.UsageError(f"--what: unknown {unknown}; known: {sorted(MEASUREMENTS)}")
  config = _CONFIG.value
  common = _common_fields(config)
  for what in _WHAT.value:
    for row in MEASUREMENTS[what](config):
      # Other work on the host slows every measurement; the load says how much to trust one.
      row["load_avg_1m"] = round(os.getloadavg()[0], 2)
      print(json.dumps({**common, **row}), flush=True)
  if "tensorflow" in sys.modules:
    logging.warning("TensorFlow was imported; the accelerator machines cannot run it.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
