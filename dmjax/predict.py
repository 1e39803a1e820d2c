"""Mask and depth for your own photo pairs, with a trained run.

  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg=COMPOSITE.jpg --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg_dir=BGS --fg_bg_dir=COMPOSITES --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg_dir=COMPOSITES --out=OUTDIR

In folders, composites pair with the background of the same name (extension aside), or all with
the one `--bg`. For each composite NAME this writes, at the composite's own size:

  NAME_mask.png         8-bit grayscale: the mask probability × 255
  NAME_depth.png        16-bit grayscale: depth in [0, 1] × 65535, 0 = NEAREST, the convention
                        of every dataset here (dmjax.data.schema); relative depth, not metres
                        unless the run was trained on the synthetic scenes (1 = 10 m)
  NAME_depth_color.png  depth colour-mapped, dark = near (dmjax.visualize.colorize)
  NAME_overlay.png      with --overlay: bg | fg_bg | the mask over fg_bg | depth, side by side

Any size and any format PIL reads (grayscale, RGBA and 16-bit images become RGB; EXIF rotation
is applied). `--fit=auto` (default) predicts at the photo's own size: the model at a working
size where objects look as in training, then the run's refiner in 2x steps up to the photo
(`Predictor`); `--fit=resize` squeezes each pair to the run's square resolution and the outputs
back; `--fit=pad` runs the fully convolutional model at the image's own size, padded.
Existing outputs are never replaced without `--overwrite`.
Bad input (an unreadable file, sizes that differ, a missing partner, an existing output) is
reported on one line naming the file; in folders the rest still runs, and the exit status is 1.

In a notebook, on numpy arrays (uint8 or [0, 1] floats, (H, W, C) or batches (B, H, W, C)):

  predictor = Predictor.from_workdir("workdirs/r64")
  mask, depth = predictor(bg, fg_bg)   # float32 in [0, 1], (H, W) or (B, H, W)

This module needs no TensorFlow and no TFDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from PIL import Image, ImageOps

from dmjax import checkpoints, errors, models, visualize
from dmjax.data import schema
from dmjax.models import layers, refiner

FITS = ("auto", "resize", "pad")
OUTPUT_KINDS = ("mask", "depth", "depth_color")


class Prediction(NamedTuple):
  mask: np.ndarray  # Probability of the object, float32 in [0, 1].
  depth: np.ndarray  # Float32 in [0, 1], 0 = nearest.


def as_uint8_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 or [0, 1] float → uint8 (H, W, 3)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise errors.UserError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
                           f"got shape {image.shape}")
  if image.dtype != np.uint8:
    if not np.issubdtype(image.dtype, np.floating):
      raise errors.UserError(f"{what}: expected uint8 or float in [0, 1], got {image.dtype}")
    # The model was trained on 8-bit photos; rounding to them loses nothing it could use.
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]  # Alpha dropped: a composite's pixels are what the camera saw.


def _resize_photo(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  # PIL's bilinear on uint8, exactly what the evaluation pipeline does to full frames.
  if image.shape[1::-1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if values.shape[1::-1] == size:
    return values
  resized = np.asarray(Image.fromarray(values).resize(size, Image.Resampling.BILINEAR))
  return np.clip(resized, 0.0, 1.0)


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
  height, width = image.shape[:2]
  pad_height, pad_width = -height % multiple, -width % multiple
  # Repeated edge pixels, so the padding adds no edge the model could mistake for an object.
  return np.pad(image, ((0, pad_height), (0, pad_width), (0, 0)), mode="edge")


@dataclasses.dataclass
class Predictor:
  """A trained model that predicts at any image size: `Predictor.from_workdir(workdir)`.

  `fit` is how a photo meets the model:
    auto    (default) at the photo's own size: the model at a working size where objects look
            as in training, then (for a refined model) the refiner in 2x steps up to the photo's
            size (`dmjax.models.refiner.Cascade`; depth from the model at its own working
            size); sharp edges at any size, bounded memory.
    resize  squeezed to the run's square training resolution, outputs resized back.
    pad     the whole model at the photo's own size, padded to the size multiple it needs.
  """

  model: Any
  variables: Any
  resolution: int
  step: int = 0
  fit: str = "auto"
  batch_size: int = 8
  config: Any = None  # The run's config, when it came from a workdir.

  def __post_init__(self):
    if self.fit not in FITS:
      raise errors.UserError(f"fit={self.fit!r}: expected one of {FITS}")
    if self.batch_size < 1:
      raise errors.UserError(f"batch_size={self.batch_size}: expected at least 1")
    self.variables = jax.device_put(self.variables)
    self._forward = jax.jit(functools.partial(models.predict_probabilities, self.model))
    refined = isinstance(self.model, refiner.Refined)
    self._multiple = layers.SIZE_MULTIPLE * (refiner.REFINE_FACTOR if refined else 1)
    base_resolution = self.resolution // refiner.REFINE_FACTOR if refined else self.resolution
    self._cascade = refiner.Cascade(self.model, self.variables, base_resolution)

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, fit: str = "auto",
                   batch_size: int = 8) -> Predictor:
    """The latest (or `step`) checkpoint of a training run, with the model its config names."""
    config, variables, step = checkpoints.restore_model(workdir, step)
    return cls(model=models.create_model(config.model), variables=variables,
               resolution=int(config.data.resolution), step=step, fit=fit,
               batch_size=batch_size, config=config)

  def __call__(self, bg: np.ndarray, fg_bg: np.ndarray) -> Prediction:
    """Mask probability and depth for one pair (H, W[, C]) or a batch (B, H, W, C)."""
    bg, fg_bg = np.asarray(bg), np.asarray(fg_bg)
    single = bg.ndim < 4
    bgs, fg_bgs = (bg[None], fg_bg[None]) if single else (bg, fg_bg)
    if len(bgs) != len(fg_bgs) or (bg.ndim == 4) != (fg_bg.ndim == 4):
      raise errors.UserError(f"bg has shape {bg.shape} but fg_bg {fg_bg.shape}: give one pair or "
                             "two batches of the same length")
    results = self.predict_pairs(list(zip(bgs, fg_bgs, strict=True)))
    mask = np.stack([r.mask for r in results])
    depth = np.stack([r.depth for r in results])
    return Prediction(mask[0], depth[0]) if single else Prediction(mask, depth)

  def predict_pairs(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
    """Predictions for pairs of any (each its own) size, in batches of `batch_size`."""
    inputs = []
    for index, (bg, fg_bg) in enumerate(pairs):
      bg, fg_bg = as_uint8_rgb(bg, f"bg {index}"), as_uint8_rgb(fg_bg, f"fg_bg {index}")
      if bg.shape != fg_bg.shape:
        raise errors.UserError(f"pair {index}: bg is {_size(bg)} but fg_bg is {_size(fg_bg)}; a "
                               "pair must be the same size")
      inputs.append(self._model_input(bg, fg_bg))
    outputs: list[Prediction | None] = [None] * len(inputs)
    # Equal shapes share a batch (and one compiled program); in "resize" mode all are equal.
    by_shape: dict[tuple, list[int]] = {}
    for index, (bg, _) in enumerate(inputs):
      by_shape.setdefault(bg.shape, []).append(index)
    for indices in by_shape.values():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        mask, depth = self._run([inputs[i] for i in chunk])
        for row, index in enumerate(chunk):
          height, width = np.shape(pairs[index][0])[:2]
          outputs[index] = Prediction(*(self._to_input_size(m[row], height, width)
                                        for m in (mask, depth)))
    return outputs

  def _model_input(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.fit == "resize":
      size = (self.resolution, self.resolution)
      bg, fg_bg = _resize_photo(bg, size), _resize_photo(fg_bg, size)
    elif self.fit == "pad":
      bg, fg_bg = _pad_to_multiple(bg, self._multiple), _pad_to_multiple(fg_bg, self._multiple)
    return schema.normalize_photo(bg, "bg"), schema.normalize_photo(fg_bg, "fg_bg")

  def _run(self, inputs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if self.fit == "auto":
      # Photos of their own sizes compile per size anyway; padding one large photo to a batch
      # of copies would multiply its time and memory.
      forward, padded = self._cascade, inputs
    else:
      # A short last batch is padded with copies, so every batch has one shape: one compilation.
      forward = functools.partial(self._forward, self.variables)
      padded = inputs + [inputs[-1]] * (self.batch_size - len(inputs))
    bg = np.stack([b for b, _ in padded])
    fg_bg = np.stack([f for _, f in padded])
    mask, depth = jax.device_get(forward(bg, fg_bg))
    return mask[:len(inputs), ..., 0], depth[:len(inputs), ..., 0]

  def _to_input_size(self, values: np.ndarray, height: int, width: int) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if self.fit != "resize":
      return values[:height, :width]
    return _resize_map(values, (width, height))


def _size(image: np.ndarray) -> str:
  return f"{image.shape[1]}×{image.shape[0]}"


# ---- Files and folders.


def read_image(path: str) -> np.ndarray:
  """Any image PIL reads → uint8 RGB (H, W, 3), upright per its EXIF orientation."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale: PIL's convert("RGB") would clip it at 255 instead of scaling it.
        values = np.asarray(image, np.float64) / 65535.0
        return as_uint8_rgb(values.astype(np.float32), path)
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.UserError(f"{path}: cannot read it as an image ({e})") from None


@dataclasses.dataclass(frozen=True)
class Job:
  """One composite to predict, its background, and the NAME of its outputs."""

  name: str
  bg: str
  fg_bg: str


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def list_images(folder: str) -> list[str]:
  """The files of a folder with an image extension PIL knows, sorted; refuses an empty one."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such folder")
  extensions = {e.lower() for e in Image.registered_extensions()}
  paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
           if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions
           and os.path.isfile(os.path.join(folder, name))]
  if not paths:
    raise errors.UserError(f"{folder}: no images in this folder")
  return paths


def find_jobs(*, bg: str | None, fg_bg: str | None, bg_dir: str | None,
              fg_bg_dir: str | None) -> tuple[list[Job], list[str]]:
  """The jobs the arguments ask for, and a one-line problem for each composite without a job.

  Raises ValueError for combinations that make no sense and for an empty folder.
  """
  if (fg_bg is None) == (fg_bg_dir is None):
    raise errors.UserError("give exactly one of --fg_bg (a composite) and --fg_bg_dir (a folder)")
  if (bg is None) == (bg_dir is None):
    raise errors.UserError("give exactly one of --bg (one background) and --bg_dir (a folder)")
  if fg_bg is not None:
    if bg_dir is not None:
      raise errors.UserError("--bg_dir pairs folders; with one --fg_bg give its --bg")
    return [Job(_stem(fg_bg), bg, fg_bg)], []

  composites = list_images(fg_bg_dir)
  by_name: dict[str, list[str]] = {}
  for path in composites:
    by_name.setdefault(_stem(path), []).append(path)
  backgrounds: dict[str, list[str]] = {}
  if bg_dir is not None:
    for path in list_images(bg_dir):
      backgrounds.setdefault(_stem(path), []).append(path)

  jobs, problems = [], []
  for name, paths in by_name.items():
    if len(paths) > 1:
      problems += [f"{p}: another composite is also named {name!r} "
                   f"({', '.join(os.path.basename(q) for q in paths if q != p)}); their outputs "
                   "would collide" for p in paths]
      continue
    if bg is not None:
      jobs.append(Job(name, bg, paths[0]))
    elif name not in backgrounds:
      problems.append(f"{paths[0]}: no background named {name}.* in {bg_dir}")
    elif len(backgrounds[name]) > 1:
      problems.append(f"{paths[0]}: several backgrounds are named {name}.* in {bg_dir} "
                      f"({', '.join(os.path.basename(q) for q in backgrounds[name])})")
    else:
      jobs.append(Job(name, backgrounds[name][0], paths[0]))
  return jobs, problems


def output_paths(out_dir: str, name: str, overlay: bool) -> dict[str, str]:
  kinds = OUTPUT_KINDS + (("overlay",) if overlay else ())
  return {kind: os.path.join(out_dir, f"{name}_{kind}.png") for kind in kinds}


def load_job(job: Job, paths: dict[str, str], *,
             overwrite: bool) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one pair; refuses one whose outputs exist (unless `overwrite`)."""
  if not overwrite:
    for path in paths.values():
      if os.path.exists(path):
        raise errors.UserError(f"{path}: exists; pass --overwrite to replace it")
  bg, fg_bg = read_image(job.bg), read_image(job.fg_bg)
  if bg.shape != fg_bg.shape:
    raise errors.UserError(f"{job.fg_bg}: is {_size(fg_bg)} but its background {job.bg} is "
                           f"{_size(bg)}; a pair must be the same size")
  return bg, fg_bg


def overlay_picture(bg: np.ndarray, fg_bg: np.ndarray, prediction: Prediction,
                    gap: int = 4) -> np.ndarray:
  """bg | fg_bg | the mask tinted over fg_bg | coloured depth, uint8, e.g. for a README."""
  alpha = 0.6 * prediction.mask[..., None]
  tinted = fg_bg * (1 - alpha) + np.array([255.0, 40.0, 40.0]) * alpha
  panels = [bg, fg_bg, np.round(tinted).astype(np.uint8), visualize.colorize(prediction.depth)]
  spacer = np.full((bg.shape[0], gap, 3), 255, np.uint8)
  return np.concatenate([x for panel in panels for x in (panel, spacer)][:-1], axis=1)


def write_png_atomically(path: str, image: np.ndarray) -> None:
  """Writes a temporary file beside `path`, then renames it: a reader never sees half a PNG."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_outputs(paths: dict[str, str], bg: np.ndarray, fg_bg: np.ndarray,
                  prediction: Prediction) -> None:
  images = {
      "mask": np.round(prediction.mask * 255).astype(np.uint8),
      "depth": np.round(prediction.depth * schema.DEPTH_MAX_CODE).astype(np.uint16),
      "depth_color": visualize.colorize(prediction.depth),
  }
  if "overlay" in paths:
    images["overlay"] = overlay_picture(bg, fg_bg, prediction)
  for kind, path in paths.items():
    write_png_atomically(path, images[kind])


def predict_jobs(predictor: Predictor, jobs: Sequence[Job], out_dir: str, *, overwrite: bool,
                 overlay: bool, report: Callable[[str], None],
                 progress: Callable[[int, int], None] | None = None) -> int:
  """Predicts and writes every job, a batch at a time; reports each failure, returns their
  number. A bad pair fails alone: the rest still run."""
  failures = 0
  done = 0
  for start in range(0, len(jobs), predictor.batch_size):
    loaded = []
    for job in jobs[start:start + predictor.batch_size]:
      paths = output_paths(out_dir, job.name, overlay)
      try:
        loaded.append((paths, *load_job(job, paths, overwrite=overwrite)))
      except (errors.UserError, OSError) as e:  # This pair's files: unreadable, exist, mismatch.
        report(str(e))
        failures += 1
    if loaded:
      predictions = predictor.predict_pairs([(bg, fg_bg) for _, bg, fg_bg in loaded])
      for (paths, bg, fg_bg), prediction in zip(loaded, predictions, strict=True):
        try:
          write_outputs(paths, bg, fg_bg, prediction)
        except OSError as e:
          report(f"{paths['mask']}: cannot write ({e})")
          failures += 1
    done = min(start + predictor.batch_size, len(jobs))
    if progress:
      progress(done, len(jobs))
  return failures


def _progress_printer(stream) -> Callable[[int, int], None]:
  def show(done: int, total: int) -> None:
    end = "\n" if done == total or not stream.isatty() else ""
    print(f"\rpredict: {done}/{total} composites", end=end, file=stream, flush=True)

  return show


def parse_args(argv: Iterable[str]) -> argparse.Namespace:
  # argparse rather than absl flags: those are process-global, and this module is imported
  # beside dmjax.evaluate and dmjax.main (tests, notebooks), which define flags of the same names.
  parser = argparse.ArgumentParser(prog="python -m dmjax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="A training run's workdir.")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  parser.add_argument("--bg", help="The background photo (for one composite or a folder).")
  parser.add_argument("--fg_bg", help="One composite.")
  parser.add_argument("--bg_dir", help="Backgrounds, paired with composites by name.")
  parser.add_argument("--fg_bg_dir", help="A folder of composites.")
  parser.add_argument("--out", required=True, help="Where the outputs go (created if needed).")
  parser.add_argument("--overlay", action="store_true", help="Also write NAME_overlay.png.")
  parser.add_argument("--overwrite", action="store_true", help="Replace existing outputs.")
  parser.add_argument("--fit", choices=FITS, default="auto",
                      help="auto: at the photo's own size, refined in 2x steps (default); resize: "
                           "squeezed to the run's resolution; pad: the model at the photo's size.")
  parser.add_argument("--batch_size", type=int, default=8, help="Pairs per model call.")
  return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  folder_mode = args.fg_bg_dir is not None

  def report(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)

  try:
    jobs, problems = find_jobs(bg=args.bg, fg_bg=args.fg_bg, bg_dir=args.bg_dir,
                               fg_bg_dir=args.fg_bg_dir)
    for problem in problems:
      report(problem)
    if not folder_mode:  # One pair: check it before spending time on the model.
      load_job(jobs[0], output_paths(args.out, jobs[0].name, args.overlay),
               overwrite=args.overwrite)
    failures = len(problems)
    if jobs:
      predictor = Predictor.from_workdir(args.workdir, step=args.step, fit=args.fit,
                                         batch_size=args.batch_size)
      os.makedirs(args.out, exist_ok=True)
      failures += predict_jobs(
          predictor, jobs, args.out, overwrite=args.overwrite, overlay=args.overlay,
          report=report if folder_mode else _raise,
          progress=_progress_printer(sys.stderr) if folder_mode else None)
  except (errors.UserError, FileNotFoundError) as e:  # The user's to fix; bugs keep tracebacks.
    raise SystemExit(f"error: {e}") from None
  if failures:
    total = len(jobs) + len(problems)
    raise SystemExit(f"error: {failures} of {total} composites failed (see above); the others "
                     f"are in {args.out}")


def _raise(message: str) -> None:
  raise errors.UserError(message)


if __name__ == "__main__":
  main()
