"""Throughput measurements, one JSON line per measurement on stdout.

  python -m dmjax.benchmark --config=configs/r64.py [--what=step,augment,predict,e2e,...]

Every line has `what`, `images_per_sec` (quartets per second), `device`, `jax_version`,
`config`, `batch_size` and `dtype`, plus what the measurement varies, the host's load, host
memory (`host_rss_mb` now, `host_peak_rss_mb` since the process started) and the device's peak
memory (`device_peak_memory_mb`, since the process started; null on CPU, where JAX keeps no
statistics). Rows that compile a program also give its own memory (`program_memory_mb`:
arguments + outputs + temporaries, from XLA's memory analysis). Measurements live in
`MEASUREMENTS`, {what: function(config) -> iterable of rows}; add new ones there.

  step       training steps on a batch already on the device, compiled ahead of time, timed in
             `--repeats` rounds of whole steps lasting at least `--repeat_seconds` each; median,
             min and max images/s, XLA's FLOPs per image, the achieved FLOP/s and its fraction
             of the device's peak (dmjax.flops). The runners, timed in turn within each round so
             that the host's load falls on all alike:
               configured  the config's own model, losses and optimizer (what training runs);
               compare     each of `--models` with BCE + Dice on both heads and SGD (momentum
                           0.9, weight decay 1e-5), the loss and optimizer of the PyTorch side;
                           with `--compare_recipe=config`, with the config's own recipe instead;
               torch seed  dmjax.models.torch_seed (the seed in PyTorch) as the seed trained it:
                           float32, NCHW, cudnn.benchmark;
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
  augment    dmjax.data.device_augment alone on a device-resident stored batch: what
             on-device augmentation (data.on_device) adds to the step
  pipeline   the grain training pipeline alone at 64 and 192 px with 0, 1 and 2 worker
             processes, over a small dataset built for the purpose (rendered at the size that
             stage's config renders at), in each of `--pipeline_modes` (PIPELINE_MODES): `host`
             decodes, augments, resizes, normalises and batches; `on_device` decodes and
             batches stored examples; `predecoded` gathers them from predecoded arrays
  max_batch  the largest training batch of the config's model and recipe that fits on the device
             at `--max_batch_resolution`: found by trying batches on a GPU; on a CPU, where the
             limit is host memory shared with everything else, only an estimate from XLA's
             memory analysis at two batch sizes
  macs       XLA's multiply-accumulates of one image's inference forward pass (no timing), for
             each of `--models` at each of `--macs_resolutions`
  photo      `dmjax.inference.Predictor` (fit=auto: the model at its working size, the refiner in
             2x steps up to the photo) on one pair of each `--photo_sizes`, in a fresh process
             per size: seconds per pair after a warm-up call, the first call's (compiling), and
             that process's peak RSS; the config's model at initialisation, or `--workdir`'s
  render     the synthetic renderer alone at 80 and 192 px: `images_per_sec` once the example's
             room is rendered (what a long build mostly does), `cold_images_per_sec` when every
             example needs a new room

This module must not import TensorFlow (the accelerator machines have none) and imports torch
only when a measurement asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dmjax import errors, flops, inference, models, parallel, train
from dmjax.data import pipeline, synthetic
from dmjax.evaluation import evaluator

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=False)
_WHAT = flags.DEFINE_list("what", ["step", "augment", "predict", "e2e", "pipeline", "max_batch"],
                          "Measurements to run, in order.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds of the step, predict and e2e rows.")
_REPEAT_SECONDS = flags.DEFINE_float(
    "repeat_seconds", 2.0, "Least time of one timed repeat (whole steps; at least one).")
_MODELS = flags.DEFINE_list("models", ["depthmasknet", "depthmasknet_v2"],
                            "Models of the compare rows of `step` and of `predict`.")
_COMPARE_RECIPE = flags.DEFINE_enum(
    "compare_recipe", "torch", ["torch", "config"],
    "Loss, optimizer and feeding of the compare rows: the PyTorch side's (BCE + Dice, SGD, model "
    "inputs) or the config's own (only the model changes; for comparing models).")
_DTYPES = flags.DEFINE_list("dtypes", [],
                            "Compute dtypes of the compare rows; empty = config.model.dtype.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch seed beside dmjax in `step`.")
_TORCH_VARIANTS = flags.DEFINE_list("torch_variants", ["seed", "best", "best_fp32"],
                                    "PyTorch runners, keys of TORCH_VARIANTS.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True,
                                   "Use torch.compile in the PyTorch runners that call for it.")
_PREDICT_BATCH = flags.DEFINE_integer("predict_batch", 256, "Large batch of the predict rows.")
_MACS_RESOLUTIONS = flags.DEFINE_list("macs_resolutions", ["64", "192"],
                                      "Input sizes of the macs rows.")
_MAX_BATCH_RESOLUTION = flags.DEFINE_integer("max_batch_resolution", 192,
                                             "Input size of the max_batch row.")
_PIPELINE_RESOLUTIONS = flags.DEFINE_list("pipeline_resolutions", ["64", "192"],
                                          "Model input sizes to measure the pipeline at.")
_PIPELINE_MODES = flags.DEFINE_list("pipeline_modes", ["host", "on_device", "predecoded"],
                                    "What the host does, keys of PIPELINE_MODES.")
_E2E_MODES = flags.DEFINE_list("e2e_modes", [],
                               "How e2e feeds the step, keys of PIPELINE_MODES; empty = as the "
                               "config does.")
_PIPELINE_WORKERS = flags.DEFINE_list("pipeline_workers", ["0", "1", "2"],
                                      "grain worker-process counts to measure.")
_PIPELINE_EXAMPLES = flags.DEFINE_integer(
    "pipeline_examples", 512, "Training examples in the dataset built for the pipeline rows.")
_RENDER_RESOLUTIONS = flags.DEFINE_list("render_resolutions", ["80", "192"],
                                        "Render sizes to measure the renderer at.")
_PHOTO_SIZES = flags.DEFINE_list("photo_sizes", ["512x512", "1024x1024", "2048x1536"],
                                 "WIDTHxHEIGHT of the photo pairs of the `photo` rows.")
_WORKDIR = flags.DEFINE_string("workdir", None, "`photo` rows: a trained run's latest "
                               "checkpoint instead of the config's model at initialisation.")
_SECONDS = flags.DEFINE_float("seconds", 10.0,
                              "Time per pipeline and render measurement, after warm-up (or "
                              "--max_batches first).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 400, "Most batches per pipeline measurement.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 5,
                                       "Batches not timed (worker start-up, first reads).")

Row = dict
MiB = 2**20

# The loss and optimizer of the compare rows, the same on the PyTorch side (`_torch_bce_dice`,
# torch.optim.SGD): the seed's BCE + Dice, here on both heads, so that neither side is charged
# for a loss the other does not compute.
COMPARE_LOSS = {"mask_bce": 1.0, "mask_dice": 1.0, "depth_l1": 0.0, "depth_ssim": 0.0,
                "depth_edge": 0.0, "depth_bce_dice": 1.0, "dice_per_image": False}
COMPARE_OPTIMIZER = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "weight_decay": 1e-5,
                     "schedule": "step", "step_every": 0, "grad_clip_norm": 0.0}


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


@dataclasses.dataclass
class Runner:
  """Something timed in whole steps: `run(n)` does n steps of `batch_size` and waits for them."""

  name: str
  run: Callable[[int], None]
  batch_size: int
  row: Row = dataclasses.field(default_factory=dict)  # What describes it in its output row.


def _seconds_of(run: Callable[[int], None], steps: int) -> float:
  start = time.perf_counter()
  run(steps)
  return time.perf_counter() - start


def interleaved_rates(runners: list[Runner], *, repeats: int,
                      repeat_seconds: float) -> dict[str, list[float]]:
  """Images/s of every runner in each of `repeats` rounds.

  Each runner first runs a step untimed (first-call work: allocation, autotuning, compilation
  where it is lazy) and a timed one that sizes its repeats. A round then times every runner in
  turn, so a change in the host's load falls on all of them, and per-round ratios cancel it.
  """
  steps = {}
  for runner in runners:
    runner.run(1)
    steps[runner.name] = max(1, math.ceil(repeat_seconds / _seconds_of(runner.run, 1)))
  logging.info("Timing %s steps per repeat.", steps)
  rates = {runner.name: [] for runner in runners}
  for round_index in range(repeats):
    for runner in runners:
      n = steps[runner.name]
      rates[runner.name].append(n * runner.batch_size / _seconds_of(runner.run, n))
    logging.info("Round %d/%d: %s images/s.", round_index + 1, repeats,
                 {name: round(r[-1], 2) for name, r in rates.items()})
  return rates


def _rate_fields(rates: list[float]) -> Row:
  return {"images_per_sec": round(statistics.median(rates), 2),
          "images_per_sec_min": round(min(rates), 2), "images_per_sec_max": round(max(rates), 2),
          "repeats": len(rates)}


def _median_ratio(numerator: list[float], denominator: list[float]) -> float:
  return round(statistics.median(a / b for a, b in zip(numerator, denominator, strict=True)), 3)


def random_batch(batch_size: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch of the pipeline's shapes and dtypes (values only need to be plausible)."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, resolution, resolution)
  return {"bg": rng.standard_normal((*shape, 3), np.float32),
          "fg_bg": rng.standard_normal((*shape, 3), np.float32),
          "mask": (rng.random((*shape, 1)) < 0.1).astype(np.float32),
          "depth": rng.random((*shape, 1), np.float32)}


def transfer_resolution(config: ml_collections.ConfigDict) -> int:
  """The side of the stored examples the host sends with `data.on_device`."""
  if config.data.transfer_resolution:
    return config.data.transfer_resolution
  if config.data.source == "synthetic":
    return config.data.synthetic.resolution
  return config.data.resolution + config.data.resolution // 4


def random_stored_batch(batch_size: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch as the host sends it with `data.on_device` (dmjax.data.schema's stored format)."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, resolution, resolution)
  return {"bg": rng.integers(0, 256, (*shape, 3), np.uint8),
          "fg_bg": rng.integers(0, 256, (*shape, 3), np.uint8),
          "mask": np.where(rng.random((*shape, 1)) < 0.1, 255, 0).astype(np.uint8),
          "depth": rng.integers(0, 65536, (*shape, 1), np.uint16)}


def training_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
  """A random batch of what `config`'s train step takes."""
  if config.data.on_device:
    return random_stored_batch(batch_size, transfer_resolution(config))
  return random_batch(batch_size, config.data.resolution)


def program_memory_mb(compiled) -> float | None:
  """Arguments + outputs + temporaries of a compiled program (donated arguments counted once)."""
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    return None
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return round(total / MiB, 1)


class JaxTrainer:
  """A config's training step (`train.make_train_step`), compiled once, on a resident batch.

  `run(n)` dispatches n steps without waiting in between (the state is donated from one to the
  next, as in training) and waits for the last; with `batches` (global arrays, e.g. from
  `parallel.DevicePrefetcher`), each step takes the next one instead, as training does.
  """

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]):
    mesh = parallel.create_mesh()
    model = models.create_model(config.model)
    tx = train.create_optimizer(config)
    self.sharding = parallel.batch_sharding(mesh)
    self._state = jax.device_put(
        train.create_train_state(config, model, tx, jax.random.PRNGKey(config.seed)),
        parallel.replicated(mesh))
    self.batch = parallel.to_global(batch, self.sharding)
    step = train.make_train_step(model, tx, config.loss, mesh, train.make_preprocess(config))
    self.compiled = step.lower(self._state, self.batch).compile()
    self.batch_size = config.batch_size

  def run(self, steps: int, batches: Iterator[dict[str, jax.Array]] | None = None) -> None:
    state = self._state
    for _ in range(steps):
      state, _ = self.compiled(state, self.batch if batches is None else next(batches))
    self._state = jax.block_until_ready(state)

  def fields(self) -> Row:
    flops_per_step = flops.compiled_flops(self.compiled)
    return {"flops_per_image": None if flops_per_step is None else flops_per_step / self.batch_size,
            "program_memory_mb": program_memory_mb(self.compiled)}


def compare_config(config: ml_collections.ConfigDict, model_name: str,
                   dtype: str) -> ml_collections.ConfigDict:
  """The config's stage with `model_name`, trained with the PyTorch side's loss and optimizer."""
  config = config.copy_and_resolve_references()
  if config.model.get("refiner", False):  # The bare model at its own size, as PyTorch runs it.
    config.model.refiner = False
    config.data.resolution //= 2
  config.model.name = model_name
  config.model.dtype = dtype
  config.loss.update(COMPARE_LOSS)
  config.optimizer.update(COMPARE_OPTIMIZER)
  config.data.on_device = False  # Model inputs, as the PyTorch side gets them.
  return config


def _torch_bce_dice(logits, target):
  """dmjax's bce_loss + batch-global dice_loss (smooth 1), in PyTorch."""
  import torch  # noqa: PLC0415

  probs = torch.sigmoid(logits)
  dice = 1.0 - (2.0 * (probs * target).sum() + 1.0) / (probs.sum() + target.sum() + 1.0)
  return torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + dice


# PyTorch runners: (bfloat16 autocast, channels-last, torch.compile).
TORCH_VARIANTS = {
    "seed": (False, False, False),  # How the seed trained: float32, NCHW, eager.
    "best": (True, True, True),  # As well as PyTorch can on a GPU.
    # The same in float32, for CPUs without bfloat16 arithmetic, where autocast slows it down.
    "best_fp32": (False, True, True),
}


class TorchTrainer:
  """dmjax.models.torch_seed trained with the compare rows' loss and optimizer.

  `variant` is a key of TORCH_VARIANTS. torch.compile is skipped unless `compile`; when it fails
  the runner falls back to eager and says so in its row (`compile`: "compile_failed: ...").
  cudnn.benchmark is on in every variant, as the seed had it.
  """

  def __init__(self, variant: str, batch: dict[str, np.ndarray], *, compile: bool):
    import torch  # noqa: PLC0415

    from dmjax.models import torch_seed  # noqa: PLC0415

    if variant not in TORCH_VARIANTS:
      raise errors.UserError(f"--torch_variants: unknown {variant!r}; known: "
                             f"{sorted(TORCH_VARIANTS)}")
    self._torch = torch
    self._amp, self._channels_last, use_compile = TORCH_VARIANTS[variant]
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    layout = torch.channels_last if self._channels_last else torch.contiguous_format
    model = torch_seed.DepthMaskNetTorch().to(self.device, memory_format=layout).train()
    self._optimizer = torch.optim.SGD(model.parameters(), lr=COMPARE_OPTIMIZER["learning_rate"],
                                      momentum=COMPARE_OPTIMIZER["momentum"],
                                      weight_decay=COMPARE_OPTIMIZER["weight_decay"])
    # NHWC arrays -> NCHW tensors (channels-last keeps NHWC in memory under the NCHW shape).
    self._inputs = {k: torch.from_numpy(v).permute(0, 3, 1, 2).to(self.device).contiguous(
        memory_format=layout) for k, v in batch.items()}
    self.batch_size = len(batch["bg"])
    self._forward = model
    self.compile = "off"
    if use_compile and compile:
      self._forward = torch.compile(model)
      self.compile = "on"
    if self.device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    try:
      self._step()  # Compiles, where torch.compile works.
    except Exception as error:  # noqa: BLE001 -- any failure of the compiler: report, go eager.
      if self._forward is model:
        raise
      logging.warning("torch.compile failed, timing eager PyTorch instead: %s", error)
      self.compile = f"compile_failed: {type(error).__name__}"
      self._forward = model
      self._step()

  def _step(self) -> None:
    torch = self._torch
    self._optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
      mask, depth = self._forward(self._inputs["bg"], self._inputs["fg_bg"])
    loss = (_torch_bce_dice(mask.float(), self._inputs["mask"])
            + _torch_bce_dice(depth.float(), self._inputs["depth"]))
    loss.backward()
    self._optimizer.step()

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self._step()
    if self.device.type == "cuda":
      self._torch.cuda.synchronize()

  def fields(self) -> Row:
    torch = self._torch
    peak = (torch.cuda.max_memory_allocated() / MiB if self.device.type == "cuda" else None)
    return {"torch_version": torch.__version__, "torch_device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "compile": self.compile,
            "dtype": "bfloat16 (autocast)" if self._amp else "float32",
            "channels_last": self._channels_last,
            "torch_peak_memory_mb": None if peak is None else round(peak, 1)}


@functools.cache
def _peak_flops(dtype: str) -> tuple[float, str]:
  return flops.peak_flops(jax.devices()[0], dtype)


def _efficiency_fields(flops_per_image: float | None, images_per_sec: float, dtype: str) -> Row:
  if flops_per_image is None:
    return {"flops_per_image": None}
  peak, source = _peak_flops("bfloat16" if dtype.startswith("bfloat16") else "float32")
  achieved = flops_per_image * images_per_sec
  return {"flops_per_image": round(flops_per_image), "achieved_tflops": round(achieved / 1e12, 4),
          "peak_tflops": round(peak / 1e12, 3), "peak_source": source,
          "fraction_of_peak": round(achieved / peak, 4)}


def _torch_runners(batch: dict[str, np.ndarray]) -> tuple[list[Runner], list[Row]]:
  """The PyTorch runners, or none and a row that says why."""
  if not _TORCH.value:
    return [], []
  try:
    import torch  # noqa: F401, PLC0415
  except ImportError:
    return [], [{"what": "step", "framework": "torch", "images_per_sec": None,
                 "note": "torch is not installed (pip install -e '.[torch]'): skipped"}]
  runners = []
  for variant in _TORCH_VARIANTS.value:
    trainer = TorchTrainer(variant, batch, compile=_TORCH_COMPILE.value)
    runners.append(Runner(f"torch_{variant}", trainer.run, trainer.batch_size,
                          {"framework": "torch", "model": "torch_seed", "variant": variant,
                           "loss": "bce_dice", "optimizer": "sgd", **trainer.fields()}))
  return runners, []


def measure_step(config: ml_collections.ConfigDict) -> Iterable[Row]:
  # The compare and PyTorch rows run the bare model at its own size (compare_config).
  compare_resolution = compare_config(config, config.model.name,
                                      config.model.dtype).data.resolution
  batch = random_batch(config.batch_size, compare_resolution)
  runners = []
  trainer = JaxTrainer(config, training_batch(config, config.batch_size))
  runners.append(Runner("configured", trainer.run, trainer.batch_size, {
      "framework": "jax", "model": config.model.name, "variant": "configured", "loss": "config",
      "optimizer": config.optimizer.name, "dtype": config.model.dtype,
      "on_device": bool(config.data.on_device), **trainer.fields()}))
  compare_names = []
  for model_name, dtype in itertools.product(_MODELS.value, _DTYPES.value or [config.model.dtype]):
    if _COMPARE_RECIPE.value == "config":
      model_config = config.copy_and_resolve_references()
      model_config.model.update(name=model_name, dtype=dtype)
      trainer = JaxTrainer(model_config, training_batch(model_config, config.batch_size))
      recipe = {"loss": "config", "optimizer": config.optimizer.name,
                "on_device": bool(config.data.on_device)}
    else:
      trainer = JaxTrainer(compare_config(config, model_name, dtype), batch)
      recipe = {"loss": "bce_dice", "optimizer": "sgd"}
    compare_names.append(f"{model_name}:{dtype}")
    runners.append(Runner(compare_names[-1], trainer.run, trainer.batch_size, {
        "framework": "jax", "model": model_name, "variant": "compare", **recipe, "dtype": dtype,
        **trainer.fields()}))
  torch_runners, notes = _torch_runners(batch)
  # The PyTorch model is the seed: charge it the XLA FLOPs of dmjax's seed model, so that both
  # sides' fractions of peak are of the same count.
  seed_flops = next((r.row["flops_per_image"] for r in runners if r.row["model"] == "depthmasknet"
                     and r.row["variant"] == "compare"), None)
  for runner in torch_runners:
    runner.row["flops_per_image"] = seed_flops
  runners += torch_runners

  rates = interleaved_rates(runners, repeats=_REPEATS.value, repeat_seconds=_REPEAT_SECONDS.value)
  for runner in runners:
    resolution = config.data.resolution if runner.name == "configured" else compare_resolution
    row = {"what": "step", "resolution": resolution, **runner.row,
           **_rate_fields(rates[runner.name])}
    row.update(_efficiency_fields(row.pop("flops_per_image"), row["images_per_sec"],
                                  row["dtype"]))
    if runner.name in compare_names:
      for torch_runner in torch_runners:
        row[f"ratio_to_{torch_runner.name}"] = _median_ratio(rates[runner.name],
                                                             rates[torch_runner.name])
    yield row
  yield from notes


def measure_predict(config: ml_collections.ConfigDict) -> Iterable[Row]:
  resolution = config.data.resolution
  for model_name in _MODELS.value:
    model_config = config.model.copy_and_resolve_references()
    model_config.name = model_name
    model = models.create_model(model_config)
    variables = jax.device_put(
        train.initial_variables(model, jax.random.PRNGKey(0), resolution))
    predict = jax.jit(functools.partial(evaluator.predict, model))
    for batch_size in (1, _PREDICT_BATCH.value):
      images = random_batch(batch_size, resolution)
      batch = jax.device_put({"bg": images["bg"], "fg_bg": images["fg_bg"]})
      compiled = predict.lower(variables, batch).compile()

      def run(calls: int, compiled=compiled, variables=variables, batch=batch) -> None:
        for _ in range(calls):  # Each call waits for its result: this is latency.
          jax.block_until_ready(compiled(variables, batch))

      rates = interleaved_rates([Runner("predict", run, batch_size)], repeats=_REPEATS.value,
                                repeat_seconds=_REPEAT_SECONDS.value)["predict"]
      row = {"what": "predict", "model": model_name, "batch_size": batch_size,
             "resolution": resolution, **_rate_fields(rates),
             "latency_ms": round(1e3 * batch_size / statistics.median(rates), 2),
             "program_memory_mb": program_memory_mb(compiled)}
      flops_per_call = flops.compiled_flops(compiled)
      row.update(_efficiency_fields(
          None if flops_per_call is None else flops_per_call / batch_size, row["images_per_sec"],
          config.model.dtype))
      yield row


def measure_macs(config: ml_collections.ConfigDict) -> Iterable[Row]:
  """Multiply-accumulates of one image's inference forward pass, from XLA's cost analysis (half
  its FLOPs, so elementwise work is in it too), for each of `--models` and `--macs_resolutions`.
  Compiled, not run."""
  for model_name, resolution in itertools.product(_MODELS.value, _MACS_RESOLUTIONS.value):
    model_config = config.model.copy_and_resolve_references()
    model_config.name = model_name
    model = models.create_model(model_config)
    images = jax.ShapeDtypeStruct((1, int(resolution), int(resolution), 3), np.float32)
    variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x, x), images)
    forward = jax.jit(functools.partial(models.predict_probabilities, model))
    flops_per_image = flops.compiled_flops(forward.lower(variables, images, images).compile())
    yield {"what": "macs", "model": model_name, "resolution": int(resolution),
           "xla_gmac": None if flops_per_image is None else round(flops_per_image / 2e9, 3)}


PIPELINE_MODES = {  # --pipeline_modes: (data.on_device, data.predecoded)
    "host": (False, False),  # decode, augment, resize, normalise on the host
    "on_device": (True, False),  # decode and gather; the step augments
    "predecoded": (True, True),  # gather from predecoded arrays; the step augments
}


def _pipeline_config(config: ml_collections.ConfigDict, resolution: int, num_workers: int,
                     mode: str | None = None) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.data.resolution = resolution
  config.data.num_workers = num_workers
  if mode is not None:
    config.data.on_device, config.data.predecoded = PIPELINE_MODES[mode]
    config.data.transfer_resolution = 0  # As rendered, below.
  if config.data.source == "synthetic":
    # The size the stage configs render at for this input size (dmjax.config.stage_config), on
    # a dataset just big enough that several hundred batches cycle through it.
    config.data.synthetic.resolution = resolution + resolution // 4
    config.data.synthetic.num_train = _PIPELINE_EXAMPLES.value
    config.data.synthetic.num_test = 8
  return config


def _train_iterator(config: ml_collections.ConfigDict) -> pipeline.TrainIterator:
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is for rows.
    pipeline.prepare(config)
  return pipeline.create_train_iterator(config, process_index=0, process_count=1)


def measure_e2e(config: ml_collections.ConfigDict) -> Iterable[Row]:
  for mode in _E2E_MODES.value or [None]:
    run_config = _pipeline_config(config, config.data.resolution, config.data.num_workers, mode)
    iterator = _train_iterator(run_config)
    try:
      trainer = JaxTrainer(run_config, next(iterator))
      resident = Runner("step", trainer.run, trainer.batch_size)
      # Fed as training feeds it: the next batches already on their way to the devices.
      batches = parallel.DevicePrefetcher(iterator, trainer.sharding)
      fed = Runner("e2e", functools.partial(trainer.run, batches=batches), trainer.batch_size)
      rates = interleaved_rates([resident, fed], repeats=_REPEATS.value,
                                repeat_seconds=_REPEAT_SECONDS.value)
    finally:
      iterator.close()
    yield {"what": "e2e", "model": config.model.name, "resolution": config.data.resolution,
           "num_workers": run_config.data.num_workers, **_rate_fields(rates["e2e"]),
           "step_images_per_sec": round(statistics.median(rates["step"]), 2),
           "e2e_over_step": _median_ratio(rates["e2e"], rates["step"]),
           "augment": bool(run_config.data.augment.enabled),
           "on_device": bool(run_config.data.on_device),
           "predecoded": bool(run_config.data.predecoded),
           "program_memory_mb": program_memory_mb(trainer.compiled)}


def measure_pipeline(config: ml_collections.ConfigDict) -> Iterable[Row]:
  for resolution, mode, num_workers in itertools.product(
      map(int, _PIPELINE_RESOLUTIONS.value), _PIPELINE_MODES.value,
      map(int, _PIPELINE_WORKERS.value)):
    run_config = _pipeline_config(config, resolution, num_workers, mode)
    iterator = _train_iterator(run_config)
    try:
      for _ in range(_WARMUP_BATCHES.value):
        next(iterator)
      rate, batches = _timed_rate(lambda it=iterator: len(next(it)["bg"]),
                                  seconds=_SECONDS.value, max_steps=_MAX_BATCHES.value)
    finally:
      iterator.close()
    yield {"what": "pipeline", "images_per_sec": round(rate, 1),
           "batch_size": run_config.batch_size, "num_workers": num_workers,
           "resolution": resolution, "mode": mode,
           "source_resolution": (run_config.data.synthetic.resolution
                                 if run_config.data.source == "synthetic" else None),
           "augment": bool(run_config.data.augment.enabled), "batches": batches}


def measure_augment(config: ml_collections.ConfigDict) -> Iterable[Row]:
  """`dmjax.data.device_augment` alone: what on-device augmentation adds to each step."""
  run_config = config.copy_and_resolve_references()
  run_config.data.on_device = True
  mesh = parallel.create_mesh()
  sharding = parallel.batch_sharding(mesh)
  augment_batch = jax.jit(train.make_preprocess(run_config),
                          in_shardings=(sharding, None, None), out_shardings=sharding)
  size = transfer_resolution(run_config)
  batch = parallel.to_global(random_stored_batch(config.batch_size, size), sharding)
  key = jax.random.PRNGKey(0)
  compiled = augment_batch.lower(batch, key, 0).compile()

  def run(calls: int) -> None:
    jax.block_until_ready([compiled(batch, key, step) for step in range(calls)])

  rates = interleaved_rates([Runner("augment", run, config.batch_size)], repeats=_REPEATS.value,
                            repeat_seconds=_REPEAT_SECONDS.value)["augment"]
  yield {"what": "augment", "resolution": config.data.resolution, "source_resolution": size,
         "augment": bool(config.data.augment.enabled), **_rate_fields(rates),
         "program_memory_mb": program_memory_mb(compiled)}


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

  Doubles from `start` until a batch fails, then bisects; batches stay multiples of `multiple`
  (the device count). Raises if `start` itself does not fit.
  """
  if not fits(start):
    raise ValueError(f"batch {start} does not fit")
  good, bad = start, 2 * start
  while fits(bad):
    good, bad = bad, 2 * bad
  while bad - good > max(multiple, good // 32):
    middle = (good + bad) // 2 // multiple * multiple
    good, bad = (middle, bad) if fits(middle) else (good, middle)
  return good, bad


def _program_bytes(config: ml_collections.ConfigDict, batch_size: int) -> float:
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  compiled = JaxTrainer(config, training_batch(config, batch_size)).compiled
  return program_memory_mb(compiled) * MiB


def measure_max_batch(config: ml_collections.ConfigDict) -> Iterable[Row]:
  run_config = config.copy_and_resolve_references()
  run_config.data.resolution = _MAX_BATCH_RESOLUTION.value
  stats = jax.devices()[0].memory_stats() or {}
  row = {"what": "max_batch", "images_per_sec": None, "model": config.model.name,
         "resolution": run_config.data.resolution}
  if "bytes_limit" in stats:
    good, bad = largest_fitting_batch(functools.partial(_fits, run_config),
                                      start=jax.device_count(), multiple=jax.device_count())
    yield {**row, "max_batch": good, "first_failed_batch": bad,
           "memory_limit_mb": round(stats["bytes_limit"] / MiB)}
    return
  # No device memory limit (CPU): memory is linear in the batch, so two compiled programs give
  # the slope; nothing is run, so the host (shared) is not pushed into swapping.
  small, large = 8, 16
  small_bytes, large_bytes = _program_bytes(run_config, small), _program_bytes(run_config, large)
  per_image = (large_bytes - small_bytes) / (large - small)
  host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  yield {**row, "max_batch": None,
         "estimated_max_batch": int((host_bytes - (small_bytes - small * per_image)) // per_image),
         "program_mb_per_image": round(per_image / MiB, 2),
         "memory_limit_mb": round(host_bytes / MiB),
         "note": "estimate against the host's physical memory from XLA's memory analysis"}


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


def _photo_predictor(config_json: str, workdir: str | None):

  if workdir:
    return inference.Predictor.from_workdir(workdir, batch_size=1)
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = models.create_model(config.model)
  variables = train.initial_variables(model, jax.random.PRNGKey(0), config.data.resolution)
  return inference.Predictor(model=model, variables=variables,
                           resolution=config.data.resolution, batch_size=1)


def _time_photo(config_json: str, workdir: str | None, width: int, height: int,
                repeats: int) -> Row:
  """In a fresh process: seconds per pair after a warm-up call, and the process's peak RSS."""
  predictor = _photo_predictor(config_json, workdir)
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
          "levels": [list(s) for s in predictor._cascade.sizes(height, width)],
          "process_peak_rss_mb": round(own_peak_rss_bytes() / MiB, 1)}


def own_peak_rss_bytes() -> int:
  """This process's own peak RSS (VmHWM). Unlike ru_maxrss, which after fork and exec keeps
  the parent's high-water mark, it starts afresh in every new program."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise OSError("/proc/self/status has no VmHWM line")


def measure_photo(config: ml_collections.ConfigDict) -> Iterable[Row]:
  """`Predictor` (fit=auto, dmjax.models.refiner.Cascade) on one photo pair of each size."""
  import multiprocessing  # noqa: PLC0415

  config_json = config.copy_and_resolve_references().to_json()
  for size in _PHOTO_SIZES.value:
    width, height = (int(x) for x in size.lower().split("x"))
    # One fresh process per size: its peak RSS is that size's, compilation included.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
      row = pool.apply(_time_photo, (config_json, _WORKDIR.value, width, height,
                                     _REPEATS.value))
    yield {"what": "photo", "width": width, "height": height, "model": config.model.name,
           "refiner": bool(config.model.get("refiner", False)), "workdir": _WORKDIR.value,
           "images_per_sec": round(1 / row["seconds_per_pair"], 3), **row}


MEASUREMENTS: dict[str, Callable[[ml_collections.ConfigDict], Iterable[Row]]] = {
    "step": measure_step,
    "predict": measure_predict,
    "e2e": measure_e2e,
    "pipeline": measure_pipeline,
    "augment": measure_augment,
    "max_batch": measure_max_batch,
    "render": measure_render,
    "photo": measure_photo,
    "macs": measure_macs,
}


def _common_fields(config: ml_collections.ConfigDict) -> Row:
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}", "host_cpus": os.cpu_count(),
          "jax_version": jax.__version__,
          "config": config_flags.get_config_filename(flags.FLAGS["config"]),
          "batch_size": config.batch_size, "dtype": config.model.dtype}


def memory_fields() -> Row:
  """Host RSS now and at its peak, and the device's peak memory in use (null where unknown)."""
  # ru_maxrss is in KiB on Linux (bytes on macOS, which this project does not target).
  row = {"host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  try:
    with open("/proc/self/statm") as statm:
      row["host_rss_mb"] = round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB,
                                 1)
  except OSError:
    row["host_rss_mb"] = None
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  row["device_peak_memory_mb"] = None if peak is None else round(peak / MiB, 1)
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [what for what in _WHAT.value if what not in MEASUREMENTS]
  if unknown:
    raise app.UsageError(f"--what: unknown {unknown}; known: {sorted(MEASUREMENTS)}")
  # Set before JAX starts its backend. Without it JAX takes 75% of GPU memory up front: PyTorch
  # in the same process would starve, and the peak memory in use would read as that 75%.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # Read by PyTorch's OpenMP runtime when torch is imported. Its default spins at barriers: on a
  # shared host (another process on a core) that made its steps 3-5x slower, which is not
  # PyTorch's speed but a scheduling accident; sleeping threads lose little when a core is free.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  config = _CONFIG.value
  common = _common_fields(config)
  for what in _WHAT.value:
    for row in MEASUREMENTS[what](config):
      # Other work on the host slows every measurement; the load says how much to trust one.
      row["load_avg_1m"] = round(os.getloadavg()[0], 2)
      print(json.dumps({**common, **row, **memory_fields()}), flush=True)
  if "tensorflow" in sys.modules:
    logging.warning("TensorFlow was imported; the accelerator machines cannot run it.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
