"""What the measurements vary: `Settings`, one field per `dmjax.benchmark` flag (the command
makes a flag of each field, with the field's `help`)."""

from __future__ import annotations

import dataclasses


def _setting(default, help: str):  # noqa: A002 -- the flag's help text.
  if isinstance(default, list):
    return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Settings:
  what: list[str] = _setting(["step", "augment", "predict", "e2e", "pipeline", "max_batch"],
                             "Measurements to run, in order (keys of MEASUREMENTS).")
  repeats: int = _setting(5, "Timed rounds of the step, predict, e2e and photo rows.")
  repeat_seconds: float = _setting(2.0, "Least time of one timed repeat (whole steps; at least "
                                   "one).")
  models: list[str] = _setting(["depthmasknet", "depthmasknet_v2"],
                               "Models of the compare rows of `step` and of `predict`.")
  compare_recipe: str = _setting(
      "torch", "Loss, optimizer and feeding of the compare rows: `torch`, the PyTorch side's "
      "(BCE + Dice, SGD, model inputs), or `config`, the config's own (only the model changes; "
      "for comparing models).")
  dtypes: list[str] = _setting([], "Compute dtypes of the compare rows; empty = "
                               "config.model.dtype.")
  torch: bool = _setting(True, "Time the original model in PyTorch beside dmjax in `step`.")
  torch_variants: list[str] = _setting(["original", "best", "best_fp32"],
                                       "PyTorch runners, keys of torch_side.TORCH_VARIANTS.")
  torch_compile: bool = _setting(True, "Use torch.compile in the PyTorch runners that call for "
                                 "it.")
  predict_batch: int = _setting(256, "Large batch of the predict rows.")
  macs_resolutions: list[str] = _setting(["64", "192"], "Input sizes of the macs rows.")
  max_batch_resolution: int = _setting(192, "Input size of the max_batch row.")
  pipeline_resolutions: list[str] = _setting(["64", "192"], "Model input sizes to measure the "
                                             "pipeline at.")
  pipeline_modes: list[str] = _setting(["decoded", "predecoded"],
                                       "What the host does, keys of training.PIPELINE_MODES.")
  e2e_modes: list[str] = _setting([], "How e2e feeds the step, keys of training.PIPELINE_MODES; "
                                  "empty = as the config does.")
  pipeline_workers: list[str] = _setting(["0", "1", "2"], "grain worker-process counts to "
                                         "measure.")
  pipeline_examples: int = _setting(512, "Training examples in the dataset built for the "
                                    "pipeline rows.")
  render_resolutions: list[str] = _setting(["80", "192"], "Render sizes to measure the renderer "
                                           "at.")
  photo_sizes: list[str] = _setting(["512x512", "1024x1024", "2048x1536"],
                                    "WIDTHxHEIGHT of the photo pairs of the `photo` rows.")
  video_size: str = _setting("256x256", "WIDTHxHEIGHT of the `video` row's generated clip.")
  video_frames: int = _setting(48, "Frames of the `video` row's clip.")
  video_batch: int = _setting(8, "Frames per model call in the `video` row.")
  serve_size: int = _setting(256, "Side of the photo pairs the `serve` row posts.")
  serve_clients: list[str] = _setting(["1", "8"], "Concurrent clients of the `serve` row.")
  sizes_requests: int = _setting(200, "Requests of the `serve_sizes` row.")
  sizes_clients: int = _setting(8, "Concurrent clients of the `serve_sizes` row.")
  sizes_count: int = _setting(50, "Distinct photo sizes of the `serve_sizes` row's requests.")
  sizes_min_side: int = _setting(240, "Shortest side of the `serve_sizes` row's photos.")
  sizes_max_side: int = _setting(4000, "Longest side of the `serve_sizes` row's photos.")
  sizes_batch: int = _setting(8, "The `serve_sizes` row's server's --batch_size.")
  workdir: str | None = _setting(None, "`photo`, `video` and `serve` rows: a trained run's latest "
                                 "checkpoint instead of the config's model at initialisation.")
  seconds: float = _setting(10.0, "Time per pipeline, render and serve measurement, after "
                            "warm-up (or --max_batches first).")
  run_steps: int = _setting(200, "Training steps of each `run` row's main job.")
  run_allocators: list[str] = _setting(["system", "auto"], "Allocators of the `run` rows "
                                       "(DMJAX_ALLOCATOR values, dmjax.allocator).")
  run_sources: list[str] = _setting([""], "Source trees of the `run` rows: '' = the installed "
                                    "dmjax, or a folder holding another checkout's dmjax/ (e.g. "
                                    "a `git worktree` of an earlier commit).")
  run_rounds: int = _setting(1, "Interleaved rounds of the `run` rows.")
  max_batches: int = _setting(400, "Most batches per pipeline measurement.")
  warmup_batches: int = _setting(5, "Batches not timed (worker start-up, first reads).")
