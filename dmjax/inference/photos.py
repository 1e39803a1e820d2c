"""Photo pairs on disk: reading them, pairing folders, writing the outputs of `dmjax.predict`.

For each composite NAME the outputs are, at the composite's own size:

  NAME_mask.png         8-bit grayscale: the mask probability × 255
  NAME_depth.png        16-bit grayscale: depth in [0, 1] × 65535, 0 = NEAREST, the convention
                        of every dataset here (dmjax.data.schema); relative depth, not metres
                        unless the run was trained on the synthetic scenes (1 = 10 m)
  NAME_depth_color.png  depth colour-mapped, dark = near (dmjax.visualize.colorize)
  NAME_overlay.png      optional: bg | fg_bg | the mask over fg_bg | depth, side by side
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from dmjax import errors, files, visualize
from dmjax.data import schema
from dmjax.inference.predictor import Prediction, Predictor, as_uint8_rgb, image_size

OUTPUT_KINDS = ("mask", "depth", "depth_color")


def to_rgb(image: Image.Image, what: str) -> np.ndarray:
  """An opened image → uint8 RGB (H, W, 3), upright per its EXIF orientation."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I", "I;16", "I;16B", "I;16L"):
    # 16-bit grayscale: PIL's convert("RGB") would clip it at 255 instead of scaling it.
    values = np.asarray(image, np.float64) / 65535.0
    return as_uint8_rgb(values.astype(np.float32), what)
  return np.asarray(image.convert("RGB"))


def read_image(path: str) -> np.ndarray:
  """Any image PIL reads → uint8 RGB (H, W, 3), upright per its EXIF orientation."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with Image.open(path) as image:
      return to_rgb(image, path)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.UserError(f"{path}: cannot read it as an image ({e})") from None


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
                  prediction: Prediction) -> None:
  images = output_images(prediction)
  if "overlay" in paths:
    images["overlay"] = overlay_picture(bg, fg_bg, prediction)
  for kind, path in paths.items():
    files.write_png(path, images[kind])


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


def demo_pair(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A smooth random background and the same with a bright rectangle pasted in (uint8 RGB):
  a pair whose answer is known, for tests and benchmarks."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, 3), np.uint8)
  bg = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
  fg_bg = bg.copy()
  fg_bg[height // 4:height // 2, width // 4:width // 2] = (250, 240, 30)
  return bg, fg_bg
