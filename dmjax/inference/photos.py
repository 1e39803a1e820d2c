"""Photo pairs on disk: reading them, pairing folders, writing the outputs of `dmjax.predict`.

For each composite NAME the outputs are, at the composite's own size:

  NAME_mask.png         8-bit grayscale: the mask probability × 255
  NAME_depth.png        16-bit grayscale: depth in [0, 1] × 65535, 0 = NEAREST, the convention
                        of every dataset here (dmjax.data.schema); relative depth, not metres
                        unless the run was trained on the synthetic scenes (1 = 10 m)
  NAME_depth_color.png  depth colour-mapped, dark = near (dmjax.visualize.colorize)
  NAME_overlay.png      optional: bg | fg_bg | the mask over fg_bg | depth, side by side
  NAME_cutout.png       optional: RGBA, the composite with the mask probability as alpha
  NAME_replace_bg.png   optional: the object over another photo (`outputs.replace_background`:
                        the new photo scaled to cover the composite, its middle kept)

A folder run (`predict_jobs`) resumes: a composite whose outputs all exist is skipped, one with
some of them gets the missing ones; existing files are never replaced without `overwrite`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from dmjax import errors, files, image_decode, visualize
from dmjax.data import schema
from dmjax.inference import outputs
from dmjax.inference.predictor import Prediction, Predictor, as_uint8_rgb, image_size

OUTPUT_KINDS = ("mask", "depth", "depth_color")  # Always written.
OPTIONAL_KINDS = ("overlay", "cutout", "replace_bg")


def to_rgb(image: Image.Image, what: str) -> np.ndarray:
  """An opened image → uint8 RGB (H, W, 3), upright per its EXIF orientation."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I", "I;16", "I;16B", "I;16L"):
    # 16-bit grayscale: PIL's convert("RGB") would clip it at 255 instead of scaling it.
    values = np.asarray(image, np.float64) / 65535.0
    return as_uint8_rgb(values.astype(np.float32), what)
  return np.asarray(image.convert("RGB"))


def read_image(path: str) -> np.ndarray:
  """A photo (`image_decode.FORMATS`) → uint8 RGB (H, W, 3), upright per its EXIF orientation."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with image_decode.opened(path) as image:  # Raster formats only; any failure a UserError.
    return to_rgb(image, path)


def output_images(prediction: Prediction,
                  kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, np.ndarray]:
  """A prediction as the arrays its outputs store: the mask 8-bit (probability × 255), depth
  16-bit (× 65535, 0 = nearest), depth colour-mapped (uint8 RGB)."""
  makers = {
      "mask": lambda: np.round(prediction.mask * 255).astype(np.uint8),
      "depth": lambda: np.round(prediction.depth * schema.DEPTH_MAX_CODE).astype(np.uint16),
      "depth_color": lambda: visualize.colorize(prediction.depth),
  }
  return {kind: makers[kind]() for kind in kinds}


@dataclasses.dataclass(frozen=True)
class Job:
  """One composite to predict, its background, and the NAME of its outputs."""

  name: str
  bg: str
  fg_bg: str


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def list_images(folder: str) -> list[str]:
  """The files of a folder with the extension of a format `image_decode` reads, sorted (an .eps
  or .pdf beside the photos is not one); refuses an empty one."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such folder")
  extensions = {extension.lower() for extension, name in Image.registered_extensions().items()
                if name in image_decode.FORMATS}
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
  # Names that differ only in case collide too: on macOS and Windows, Cat_mask.png is
  # cat_mask.png.
  by_name: dict[str, list[str]] = {}
  for path in composites:
    by_name.setdefault(_stem(path).casefold(), []).append(path)
  backgrounds: dict[str, list[str]] = {}
  if bg_dir is not None:
    for path in list_images(bg_dir):
      backgrounds.setdefault(_stem(path), []).append(path)

  jobs, problems = [], []
  for paths in by_name.values():
    name = _stem(paths[0])
    if len(paths) > 1:
      problems += [f"{p}: another composite has the same name, letter case aside "
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


def output_kinds(*, overlay: bool = False, cutout: bool = False,
                 replace_bg: bool = False) -> tuple[str, ...]:
  """The kinds of output a run writes, in the order it writes them."""
  chosen = {"overlay": overlay, "cutout": cutout, "replace_bg": replace_bg}
  return OUTPUT_KINDS + tuple(kind for kind in OPTIONAL_KINDS if chosen[kind])


def output_paths(out_dir: str, name: str, kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, str]:
  return {kind: os.path.join(out_dir, f"{name}_{kind}.png") for kind in kinds}


def outputs_to_write(paths: dict[str, str], *, overwrite: bool,
                     skip_existing: bool = False) -> dict[str, str]:
  """Those of `paths` to write: all with `overwrite`; else the missing ones, where
  `skip_existing`; else all, and an existing one is refused."""
  if overwrite:
    return dict(paths)
  missing = {kind: path for kind, path in paths.items() if not os.path.exists(path)}
  if not skip_existing and len(missing) < len(paths):
    existing = next(path for kind, path in paths.items() if kind not in missing)
    raise errors.UserError(f"{existing}: exists; pass --overwrite to replace it")
  return missing


def load_pair(job: Job) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one pair."""
  bg, fg_bg = read_image(job.bg), read_image(job.fg_bg)
  if bg.shape != fg_bg.shape:
    raise errors.UserError(f"{job.fg_bg}: is {image_size(fg_bg)} but its background {job.bg} is "
                           f"{image_size(bg)}; a pair must be the same size")
  return bg, fg_bg


def overlay_picture(bg: np.ndarray, fg_bg: np.ndarray, prediction: Prediction,
                    gap: int = 4) -> np.ndarray:
  """bg | fg_bg | the mask tinted over fg_bg | coloured depth, uint8, e.g. for a README."""
  alpha = 0.6 * prediction.mask[..., None]
  tinted = fg_bg * (1 - alpha) + np.array([255.0, 40.0, 40.0]) * alpha
  panels = [bg, fg_bg, np.round(tinted).astype(np.uint8), visualize.colorize(prediction.depth)]
  return visualize.tile_grid([panels], gap=gap)


def write_outputs(paths: dict[str, str], bg: np.ndarray, fg_bg: np.ndarray,
                  prediction: Prediction, new_bg: np.ndarray | None = None) -> None:
  """Writes the outputs `paths` names (by kind), each atomically; `new_bg` is the photo the
  `replace_bg` output puts the object on."""
  makers = {
      "overlay": lambda: overlay_picture(bg, fg_bg, prediction),
      "cutout": lambda: outputs.cutout_rgba(fg_bg, prediction.mask),
      "replace_bg": lambda: outputs.replace_background(fg_bg, prediction.mask, new_bg),
  }
  images = output_images(prediction, [kind for kind in paths if kind in OUTPUT_KINDS])
  for kind, path in paths.items():
    files.write_png(path, images[kind] if kind in images else makers[kind]())


@dataclasses.dataclass
class Summary:
  """What a folder run did with its composites."""

  written: int = 0
  skipped: int = 0  # Every output already there (`skip_existing`).
  failed: int = 0

  def line(self, total: int) -> str:
    return (f"predict: {total} composites: {self.written} written, {self.skipped} skipped "
            f"(their outputs exist), {self.failed} failed")


def _reason(error: Exception) -> str:
  """One line: a UserError or OSError names the file and says what is wrong; anything else
  (out of memory, a bug) is named by its type."""
  if isinstance(error, errors.UserError | OSError):
    return str(error)
  return f"{type(error).__name__}: {error}".splitlines()[0]


def predict_jobs(predictor: Predictor, jobs: Sequence[Job], out_dir: str, *,
                 kinds: Sequence[str] = OUTPUT_KINDS, overwrite: bool = False,
                 skip_existing: bool = False, new_bg: np.ndarray | None = None,
                 report: Callable[[str], None],
                 progress: Callable[[int, int], None] | None = None) -> Summary:
  """Predicts and writes every job; returns what was written, skipped and failed.

  Pairs are read a few at a time, up to `predictor.batch_size` pairs or
  `predictor.max_batch_pixels` pixels (a photo library's 12-megapixel pairs come one or two at a
  time, not eight). A pair whose outputs exist is skipped where `skip_existing` (one with some
  of them gets the rest: a rerun after an interruption does only what is missing), else refused
  unless `overwrite`. A bad pair fails alone: its files (unreadable, mismatched) are reported
  before the model runs; a model call that fails (out of memory on a panorama, say) is retried
  pair by pair, and each pair that still fails is reported; the rest go on.
  """
  summary = Summary()
  os.makedirs(out_dir, exist_ok=True)
  next_job = 0
  while next_job < len(jobs):
    loaded, pixels = [], 0
    while (next_job < len(jobs) and len(loaded) < predictor.batch_size
           and pixels < predictor.max_batch_pixels):
      job = jobs[next_job]
      next_job += 1
      try:
        paths = outputs_to_write(output_paths(out_dir, job.name, kinds), overwrite=overwrite,
                                 skip_existing=skip_existing)
        if not paths:
          summary.skipped += 1
          continue
        bg, fg_bg = load_pair(job)
      except Exception as e:  # noqa: BLE001 (this pair's files: whatever is wrong, it alone fails)
        report(_reason(e))
        summary.failed += 1
        continue
      loaded.append((job, paths, bg, fg_bg))
      pixels += bg.shape[0] * bg.shape[1]
    predictions = _predict_each(predictor, loaded, report)
    for (_, paths, bg, fg_bg), prediction in zip(loaded, predictions, strict=True):
      if prediction is None:
        summary.failed += 1
        continue
      try:
        write_outputs(paths, bg, fg_bg, prediction, new_bg)
        summary.written += 1
      except OSError as e:
        report(f"{next(iter(paths.values()))}: cannot write ({e})")
        summary.failed += 1
    if progress:
      progress(next_job, len(jobs))
  return summary


def _predict_each(predictor: Predictor, loaded: list,
                  report: Callable[[str], None]) -> list[Prediction | None]:
  """Predictions for the loaded pairs; where the batch fails, pair by pair, None for each that
  fails alone (reported)."""
  pairs = [(bg, fg_bg) for _, _, bg, fg_bg in loaded]
  if len(pairs) > 1:
    try:
      return predictor.predict_pairs(pairs)
    except Exception:  # noqa: BLE001 (retried pair by pair below: the culprit fails alone)
      pass
  predictions = []
  for (job, _, _, _), pair in zip(loaded, pairs, strict=True):
    try:
      predictions.append(predictor.predict_pairs([pair])[0])
    except Exception as e:  # noqa: BLE001 (reported; the folder goes on)
      logging.debug("Prediction of %s failed:", job.fg_bg, exc_info=True)
      report(f"{job.fg_bg}: prediction failed ({_reason(e)})")
      predictions.append(None)
  return predictions


def demo_pair(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A smooth random background and the same with a bright rectangle pasted in (uint8 RGB):
  a pair whose answer is known, for tests and benchmarks."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, 3), np.uint8)
  bg = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
  fg_bg = bg.copy()
  fg_bg[height // 4:height // 2, width // 4:width // 2] = (250, 240, 30)
  return bg, fg_bg
