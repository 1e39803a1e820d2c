"""Rows of inference: the model's latency and throughput, its multiply-accumulates, and
`Predictor` on photos of people's sizes."""

from __future__ import annotations

import functools
import itertools
import json
import statistics
import time
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np

from dmjax import errors, inference, models, train
from dmjax.benchmark import flops, timing
from dmjax.benchmark.settings import Settings
from dmjax.benchmark.training import efficiency_fields, random_batch
from dmjax.evaluation import evaluator


def measure_predict(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  resolution = config.data.resolution
  for model_name in settings.models:
    model_config = config.model.copy_and_resolve_references()
    model_config.name = model_name
    model = models.create_model(model_config)
    variables = jax.device_put(
        train.initial_variables(model, jax.random.PRNGKey(0), resolution))
    predict = jax.jit(functools.partial(evaluator.predict, model))
    for batch_size in (1, settings.predict_batch):
      images = random_batch(batch_size, resolution)
      batch = jax.device_put({"bg": images["bg"], "fg_bg": images["fg_bg"]})
      compiled = predict.lower(variables, batch).compile()

      def run(calls: int, compiled=compiled, variables=variables, batch=batch) -> None:
        for _ in range(calls):  # Each call waits for its result: this is latency.
          jax.block_until_ready(compiled(variables, batch))

      rates = timing.interleaved_rates([timing.Runner("predict", run, batch_size)],
                                       repeats=settings.repeats,
                                       repeat_seconds=settings.repeat_seconds)["predict"]
      row = {"what": "predict", "model": model_name, "batch_size": batch_size,
             "resolution": resolution, **timing.rate_fields(rates),
             "latency_ms": round(1e3 * batch_size / statistics.median(rates), 2),
             "program_memory_mb": timing.program_memory_mb(compiled)}
      flops_per_call = flops.compiled_flops(compiled)
      row.update(efficiency_fields(
          None if flops_per_call is None else flops_per_call / batch_size, row["images_per_sec"],
          config.model.dtype))
      yield row


def measure_macs(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  """Multiply-accumulates of one image's inference forward pass, from XLA's cost analysis (half
  its FLOPs, so elementwise work is in it too), for each of `--models` and `--macs_resolutions`.
  Compiled, not run."""
  for model_name, resolution in itertools.product(settings.models, settings.macs_resolutions):
    model_config = config.model.copy_and_resolve_references()
    model_config.name = model_name
    model = models.create_model(model_config)
    images = jax.ShapeDtypeStruct((1, int(resolution), int(resolution), 3), np.float32)
    variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x, x), images)
    forward = jax.jit(functools.partial(models.predict_probabilities, model))
    flops_per_image = flops.compiled_flops(forward.lower(variables, images, images).compile())
    yield {"what": "macs", "model": model_name, "resolution": int(resolution),
           "xla_gmac": None if flops_per_image is None else round(flops_per_image / 2e9, 3)}


def _predictor(config_json: str, workdir: str | None, batch_size: int = 1) -> inference.Predictor:
  """`workdir`'s latest checkpoint, or the config's model at initialisation (for timing, the
  weights do not matter)."""
  if workdir:
    return inference.Predictor.from_workdir(workdir, batch_size=batch_size)
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = models.create_model(config.model)
  variables = train.initial_variables(model, jax.random.PRNGKey(0), config.data.resolution)
  return inference.Predictor(model=model, variables=variables,
                             resolution=config.data.resolution, batch_size=batch_size)


def _time_photo(config_json: str, workdir: str | None, width: int, height: int,
                repeats: int) -> timing.Row:
  """In a fresh process: seconds per pair after a warm-up call, and the process's peak RSS."""
  predictor = _predictor(config_json, workdir)
  rng = np.random.default_rng(0)
  bg = rng.integers(0, 256, (height, width, 3), np.uint8)
  fg_bg = bg.copy()
  box = (slice(height // 4, height // 2), slice(width // 3, width // 2))
  fg_bg[box] = 255 - fg_bg[box]
  started = time.perf_counter()
  predictor(bg, fg_bg)  # Compiles every level of this size.
  first = time.perf_counter() - started
  seconds = []
  for _ in range(repeats):
    started = time.perf_counter()
    predictor(bg, fg_bg)
    seconds.append(time.perf_counter() - started)
  return {"first_call_seconds": round(first, 2),
          "seconds_per_pair": round(statistics.median(seconds), 3),
          "min_seconds": round(min(seconds), 3), "max_seconds": round(max(seconds), 3),
          "model_inputs": {name: list(size)
                           for name, size in predictor.working_sizes(height, width).items()},
          "process_peak_rss_mb": round(timing.own_peak_rss_bytes() / timing.MiB, 1)}


def measure_photo(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  """`Predictor` (fit=auto, dmjax.inference.cascade) on one photo pair of each size."""
  import multiprocessing  # noqa: PLC0415

  config_json = config.copy_and_resolve_references().to_json()
  for size in settings.photo_sizes:
    width, height = _width_height(size)
    # One fresh process per size: its peak RSS is that size's, compilation included.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
      row = pool.apply(_time_photo, (config_json, settings.workdir, width, height,
                                     settings.repeats))
    yield {"what": "photo", "width": width, "height": height, "model": config.model.name,
           "refiner": bool(config.model.get("refiner", False)), "workdir": settings.workdir,
           "images_per_sec": round(1 / row["seconds_per_pair"], 3), **row}


def _width_height(size: str) -> tuple[int, int]:
  try:
    width, height = (int(x) for x in size.lower().split("x"))
  except ValueError:
    raise errors.UserError(f"{size!r}: expected a size WIDTHxHEIGHT, e.g. 512x512") from None
  return width, height


def measure_video(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  """`dmjax.predict --video` (decode, predict in batches, encode) on a generated clip."""
  from dmjax.inference import video  # noqa: PLC0415  (PyAV, only for this row)

  predictor = _predictor(config.copy_and_resolve_references().to_json(), settings.workdir)
  width, height = _width_height(settings.video_size)
  row = video.measure_video_frames(predictor, size=(height, width), frames=settings.video_frames,
                                   batch_size=settings.video_batch)
  yield {**row, "images_per_sec": row["frames_per_second"], "model": config.model.name,
         "workdir": settings.workdir}


def measure_serve(config: ml_collections.ConfigDict, settings: Settings) -> Iterable[timing.Row]:
  """`dmjax.serve` answering `--serve_clients` concurrent clients over loopback HTTP."""
  from dmjax.inference import server  # noqa: PLC0415  (the `serve` extra, only for this row)

  predictor = _predictor(config.copy_and_resolve_references().to_json(), settings.workdir)
  for clients in map(int, settings.serve_clients):
    row = server.measure_served_requests(predictor, size=settings.serve_size,
                                         concurrency=clients, seconds=settings.seconds)
    yield {"what": "serve", **row, "images_per_sec": row["requests_per_s"],
           "model": config.model.name, "workdir": settings.workdir}


def photo_sizes(count: int, min_side: int, max_side: int, seed: int = 0) -> list[tuple[int, int]]:
  """`count` distinct (height, width), each side drawn uniformly from [min_side, max_side]."""
  if count > (max_side - min_side + 1) ** 2:
    raise errors.UserError(f"--sizes_count={count}: there are not that many sizes between "
                           f"{min_side} and {max_side} px")
  rng = np.random.default_rng(seed)
  sizes: list[tuple[int, int]] = []
  while len(sizes) < count:
    size = tuple(int(side) for side in rng.integers(min_side, max_side + 1, 2))
    if size not in sizes:
      sizes.append(size)
  return sizes


def _jpeg_pair(height: int, width: int, seed: int) -> dict[str, tuple[str, bytes, str]]:
  import io  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  from dmjax.inference import photos  # noqa: PLC0415

  uploads = {}
  for field, image in zip(("bg", "fg_bg"), photos.demo_pair(height, width, seed), strict=True):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    uploads[field] = (f"{field}.jpg", buffer.getvalue(), "image/jpeg")
  return uploads


def measure_serve_sizes(config: ml_collections.ConfigDict,
                        settings: Settings) -> Iterable[timing.Row]:
  """`dmjax.serve`'s app (uvicorn on 127.0.0.1, in this process) after `Predictor.warm_up` (what
  `serve --warm_up` runs before it says it is ready), then `--sizes_requests` requests from
  `--sizes_clients` clients, each a JPEG pair of one of `--sizes_count` sizes (seed 0) asking
  for the mask PNG (`?format=mask`): latency percentiles, requests/s, programs compiled after
  the warm-up (the goal: none), peak RSS."""
  import queue  # noqa: PLC0415
  import threading  # noqa: PLC0415

  import requests  # noqa: PLC0415

  from dmjax.inference import compilations, server  # noqa: PLC0415 (the `serve` extra)

  predictor = _predictor(config.copy_and_resolve_references().to_json(), settings.workdir,
                         batch_size=settings.sizes_batch)
  sizes = photo_sizes(settings.sizes_count, settings.sizes_min_side, settings.sizes_max_side)
  rng = np.random.default_rng(1)
  order = [int(i) for i in rng.integers(0, len(sizes), settings.sizes_requests)]
  uploads = {index: _jpeg_pair(*sizes[index], seed=index) for index in sorted(set(order))}
  at_start = compilations.count()
  warm_up = predictor.warm_up()  # What `serve --warm_up` runs before /health says ready.
  after_warm_up = compilations.count()
  app = server.create_app(predictor, max_queue=max(64, 2 * settings.sizes_clients))
  with server.running_server(app) as url, requests.Session() as session:
    deadline = time.monotonic() + 600
    while session.get(f"{url}/health", timeout=60).status_code != 200:
      if time.monotonic() > deadline:
        raise RuntimeError("the server was not ready within 10 minutes")
      time.sleep(0.2)
    todo: queue.Queue[int] = queue.Queue()
    for index in order:
      todo.put(index)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
      with requests.Session() as own:
        while True:
          try:
            index = todo.get_nowait()
          except queue.Empty:
            return
          sent = time.perf_counter()
          response = own.post(f"{url}/predict?format=mask", files=uploads[index], timeout=600)
          latency = time.perf_counter() - sent
          with lock:
            if response.status_code == 200:
              latencies.append(latency)
            else:
              failures.append(f"{response.status_code}: {response.text[:200]}")

    window_start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True)
               for i in range(settings.sizes_clients)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    window = time.perf_counter() - window_start
    health = session.get(f"{url}/health", timeout=60).json()
  after = compilations.count()
  latencies.sort()

  def percentile(q: float) -> float | None:
    return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) \
        if latencies else None

  yield {"what": "serve_sizes", "requests": len(order), "answered": len(latencies),
         "failed": len(failures), "first_failure": failures[0] if failures else None,
         "clients": settings.sizes_clients, "distinct_sizes": len(sizes),
         "min_side": settings.sizes_min_side, "max_side": settings.sizes_max_side,
         "mean_megapixels": round(float(np.mean([h * w for h, w in sizes])) / 1e6, 2),
         "format": "mask", "batch_size": settings.sizes_batch, "seconds": round(window, 2),
         "requests_per_s": round(len(latencies) / window, 3),
         "images_per_sec": round(len(latencies) / window, 3),
         "latency_p50_s": percentile(0.5), "latency_p99_s": percentile(0.99),
         "latency_max_s": round(latencies[-1], 3) if latencies else None,
         "warm_up_s": round(warm_up.seconds, 1),
         "warm_up_compiled": after_warm_up.compiled - at_start.compiled,
         "warm_up_from_cache": after_warm_up.from_cache - at_start.from_cache,
         "model_input_shapes": len(predictor.model_input_shapes()),
         "compiled_after_warm_up": after.compiled - after_warm_up.compiled,
         "programs_after_warm_up": after.programs - after_warm_up.programs,
         "model_calls": health.get("served", {}).get("model_calls"),
         "process_peak_rss_mb": round(timing.own_peak_rss_bytes() / timing.MiB, 1),
         "model": (predictor.config or config).model.name,
         "workdir": settings.workdir}
