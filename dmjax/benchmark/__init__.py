"""Throughput measurements, one JSON line per measurement on stdout.

  python -m dmjax.benchmark --config=configs/r64.py [--what=step,augment,predict,e2e,...]

Every line has `what`, `images_per_sec` (quartets per second), `device`, `jax_version`,
`config`, `batch_size` and `dtype`, plus what the measurement varies, the host's load, host
memory (`host_rss_mb` now, `host_peak_rss_mb` since the process started) and the device's peak
memory (`device_peak_memory_mb`, since the process started; null on CPU, where JAX keeps no
statistics). Rows that compile a program also give its own memory (`program_memory_mb`:
arguments + outputs + temporaries, from XLA's memory analysis). Measurements live in
`MEASUREMENTS`, {what: function(config, settings) -> iterable of rows}; add new ones there. Each
flag is a field of `Settings`, so the same rows come from Python:
`benchmark.run(config, Settings(what=["predict"], models=["depthmasknet_v2"]))`.

  step       training steps on a batch already on the device, compiled ahead of time, timed in
             `--repeats` rounds of whole steps lasting at least `--repeat_seconds` each; median,
             min and max images/s, XLA's FLOPs per image, the achieved FLOP/s and its fraction
             of the device's peak (dmjax.benchmark.flops). The runners, timed in turn within each
             round so
             that the host's load falls on all alike:
               configured  the config's own model, losses and optimizer (what training runs);
               compare     each of `--models` with BCE + Dice on both heads and SGD (momentum
                           0.9, weight decay 1e-5), the loss and optimizer of the PyTorch side;
                           with `--compare_recipe=config`, with the config's own recipe instead;
               torch original  dmjax.models.torch_depthmasknet (the original in PyTorch) as it
                           was trained: float32, NCHW, cudnn.benchmark;
               torch best  the same as well as PyTorch can: bfloat16 autocast, channels-last and
                           torch.compile (`compile` says whether it worked);
               torch best_fp32  the same in float32: on CPUs without bfloat16 arithmetic,
                           autocast to bfloat16 makes PyTorch slower, not faster.
             Compare rows carry `ratio_to_torch_<variant>` for each PyTorch runner: the median
             over rounds of the ratio within each round. Without torch the torch rows are
             replaced by one row saying so. FLOPs of the PyTorch rows are XLA's count for
             dmjax's seed model (the same network), so fractions of peak compare like for like.
  predict    inference (sigmoid outputs, BatchNorm in inference mode) of each of `--models` at
             batch 1 (`latency_ms`) and at `--predict_batch` (throughput), on one device
  e2e        real training: the config's training step fed by the grain pipeline (its
             `data.num_workers`) through parallel.DevicePrefetcher, beside the same step on a
             device-resident batch in the same rounds; `e2e_over_step` below 1 means the input
             pipeline starves the device. `--e2e_modes` feeds it each way of PIPELINE_MODES
  augment    dmjax.data.augment alone on a device-resident stored batch: what augmenting in
             the train step adds to it
  pipeline   the grain training pipeline alone at 64 and 192 px with 0, 1 and 2 worker
             processes, over a small dataset built for the purpose (rendered at the size that
             stage's config renders at), in each of `--pipeline_modes` (PIPELINE_MODES):
             `decoded` decodes and batches stored examples; `predecoded` gathers them from
             predecoded arrays (the train step augments them either way)
  max_batch  the largest training batch of the config's model and recipe that fits on the device
             at `--max_batch_resolution`: found by trying batches on a GPU; on a CPU, where the
             limit is host memory shared with everything else, only an estimate from XLA's
             memory analysis at two batch sizes
  macs       XLA's multiply-accumulates of one image's inference forward pass (no timing), for
             each of `--models` at each of `--macs_resolutions`
  photo      `dmjax.inference.Predictor` (fit=auto: dmjax.inference.cascade's two passes) on
             one pair of each `--photo_sizes`, in a fresh process
             per size: seconds per pair after a warm-up call, the first call's (compiling), and
             that process's peak RSS; the config's model at initialisation, or `--workdir`'s
  video      `dmjax.predict --video` on a generated clip of `--video_size` (a disc crossing a
             smooth plate): frames/s of decoding, prediction in batches of `--video_batch` and
             encoding, after one warm-up pass over the clip (dmjax.inference.video)
  serve      `dmjax.serve`'s app in a loopback uvicorn server, posting pairs of `--serve_size`
             from each of `--serve_clients` concurrent clients for `--seconds`: requests/s,
             median and 90th-percentile latency, pairs per model call, after every batch shape
             is compiled (dmjax.inference.server.measure_served_requests)
  serve_sizes  the same server warmed up as `serve --warm_up` does, then `--sizes_requests`
             requests from `--sizes_clients` clients, JPEG pairs of `--sizes_count` sizes (each
             side in `--sizes_min_side`..`--sizes_max_side`, seeded) asking for the mask PNG:
             p50/p99 latency, requests/s, programs compiled after the warm-up (should be 0),
             the process's peak RSS (server and clients)
  run        the main job itself (`python -m dmjax.main`, a child process per row) for
             `--run_steps` with no evaluation or checkpoint before the end, under each of
             `--run_allocators` (dmjax.allocator) and from each of `--run_sources` (another
             checkout's code beside this one): steady steps/s from its log, wall time, user and
             system CPU seconds, minor page faults and peak RSS up to the end of training
             (/proc), in `--run_rounds` interleaved rounds
  render     the synthetic renderer alone at 80 and 192 px: `images_per_sec` once the example's
             room is rendered (what a long build mostly does), `cold_images_per_sec` when every
             example needs a new room

This module must not import TensorFlow (the accelerator machines have none) and imports torch
only when a measurement asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections

from dmjax import errors
from dmjax.benchmark import inference_rows, run_rows, timing, training
from dmjax.benchmark.settings import Settings

MEASUREMENTS: dict[str, Callable[[ml_collections.ConfigDict, Settings], Iterable[timing.Row]]] = {
    "step": training.measure_step,
    "predict": inference_rows.measure_predict,
    "e2e": training.measure_e2e,
    "pipeline": training.measure_pipeline,
    "augment": training.measure_augment,
    "max_batch": training.measure_max_batch,
    "render": training.measure_render,
    "run": run_rows.measure_run,
    "photo": inference_rows.measure_photo,
    "macs": inference_rows.measure_macs,
    "video": inference_rows.measure_video,
    "serve": inference_rows.measure_serve,
    "serve_sizes": inference_rows.measure_serve_sizes,
}


def common_fields(config: ml_collections.ConfigDict, config_name: str = "") -> timing.Row:
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}", "host_cpus": os.cpu_count(),
          "jax_version": jax.__version__, "config": config_name,
          "batch_size": config.batch_size, "dtype": config.model.dtype}


def run(config: ml_collections.ConfigDict, settings: Settings,
        config_name: str = "") -> Iterator[timing.Row]:
  """The rows of `settings.what`, in order, each with the common, load and memory fields."""
  unknown = [what for what in settings.what if what not in MEASUREMENTS]
  if unknown:
    raise errors.UserError(f"--what: unknown {unknown}; known: {sorted(MEASUREMENTS)}")
  common = common_fields(config, config_name)
  for what in settings.what:
    for row in MEASUREMENTS[what](config, settings):
      # Other work on the host slows every measurement; the load says how much to trust one.
      row["load_avg_1m"] = round(os.getloadavg()[0], 2)
      yield {**common, **row, **timing.memory_fields()}
