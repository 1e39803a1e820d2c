"""Mask and depth for your own photo pairs, with a trained run.

  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg=COMPOSITE.jpg --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg_dir=BGS --fg_bg_dir=COMPOSITES --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg_dir=COMPOSITES --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg=PLATE.jpg --video=CLIP.mp4 --out=OUTDIR
  python -m dmjax.predict --exported=MODEL.jaxexport ...   (a `dmjax.export` file, no model code)

In folders, composites pair with the background of the same name (extension aside), or all with
the one `--bg`. For each composite NAME this writes NAME_mask.png, NAME_depth.png (16-bit, 0 =
nearest), NAME_depth_color.png and, with --overlay, NAME_overlay.png, at the composite's own size
(`dmjax.inference.photos`). A video shot against a background plate (`--bg`, the empty scene
from the same camera) gives CLIP_mask.mp4 and CLIP_depth.mp4, and with --png_frames each frame's
PNGs in CLIP_mask/ and CLIP_depth/ (`dmjax.inference.video`; needs the `video` extra).

Any size and any format PIL reads (grayscale, RGBA and 16-bit images become RGB; EXIF rotation
is applied). `--fit=auto` (default) predicts at the photo's own size: the model on the whole
photo, then on a window around the object, each at the scale it was trained on
(`dmjax.inference.cascade`), then fills the mask's small holes and drops its stray pieces
(`--noclean_mask` does not); `--fit=resize` squeezes each pair to the run's square resolution
and the outputs back; `--fit=pad` runs the fully convolutional model at the image's own size.
Existing outputs are never replaced without `--overwrite`.
Bad input (an unreadable file, sizes that differ, a missing partner, an existing output) is
reported on one line naming the file; in folders the rest still runs, and the exit status is 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from absl import flags

from dmjax import cli, errors, progress
from dmjax.inference import CLEAN_MASK_HELP, FIT_HELP, FITS, Predictor, photos, video


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=f)
  flags.DEFINE_string("exported", None, "Instead of --workdir: a file from dmjax.export (a "
                      "file exported at a fixed size runs fit=resize).", flag_values=f)
  flags.mark_flags_as_mutual_exclusive(["workdir", "exported"], required=True, flag_values=f)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=f)
  flags.DEFINE_string("bg", None, "The background photo (for one composite or a folder).",
                      flag_values=f)
  flags.DEFINE_string("fg_bg", None, "One composite.", flag_values=f)
  flags.DEFINE_string("bg_dir", None, "Backgrounds, paired with composites by name.",
                      flag_values=f)
  flags.DEFINE_string("fg_bg_dir", None, "A folder of composites.", flag_values=f)
  flags.DEFINE_string("out", None, "Where the outputs go (created if needed).", flag_values=f,
                      required=True)
  flags.DEFINE_bool("overlay", False, "Also write NAME_overlay.png.", flag_values=f)
  flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=f)
  flags.DEFINE_enum("fit", "auto", FITS, FIT_HELP, flag_values=f)
  flags.DEFINE_bool("clean_mask", True, CLEAN_MASK_HELP, flag_values=f)
  flags.DEFINE_integer("batch_size", 8, "Pairs per model call.", lower_bound=1, flag_values=f)
  flags.DEFINE_string("video", None, "A video shot against the --bg plate (any format FFmpeg "
                      "reads).", flag_values=f)
  flags.DEFINE_bool("png_frames", False, "With --video: also each frame's mask and depth PNGs.",
                    flag_values=f)
  flags.DEFINE_bool("lossless", False, "With --video: lossless H.264 (exact values; not for "
                    "browsers) instead of yuv420p at CRF 18.", flag_values=f)


def _report(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def _raise(message: str) -> None:
  raise errors.UserError(message)


def load_predictor(f: flags.FlagValues) -> Predictor:
  if f.exported is None:
    return Predictor.from_workdir(f.workdir, step=f.step, fit=f.fit, batch_size=f.batch_size,
                                  clean_mask=f.clean_mask)
  if f.step is not None:
    raise errors.UserError("--step is for --workdir; an exported file holds one checkpoint")
  return Predictor.from_exported(f.exported, fit=f.fit, batch_size=f.batch_size,
                                 clean_mask=f.clean_mask)


def predict_files(f: flags.FlagValues) -> None:
  if f.video is not None:
    return predict_video(f)
  if f.png_frames or f.lossless:
    raise errors.UserError("--png_frames and --lossless are for --video")
  folder_mode = f.fg_bg_dir is not None
  jobs, problems = photos.find_jobs(bg=f.bg, fg_bg=f.fg_bg, bg_dir=f.bg_dir,
                                    fg_bg_dir=f.fg_bg_dir)
  for problem in problems:
    _report(problem)
  if not folder_mode:  # One pair: check it before spending time on the model.
    photos.load_job(jobs[0], photos.output_paths(f.out, jobs[0].name, f.overlay),
                    overwrite=f.overwrite)
  failures = len(problems)
  if jobs:
    predictor = load_predictor(f)
    os.makedirs(f.out, exist_ok=True)
    with (progress.Progress("predict", total=len(jobs), unit="composites") if folder_mode
          else contextlib.nullcontext()) as bar:
      failures += photos.predict_jobs(
          predictor, jobs, f.out, overwrite=f.overwrite, overlay=f.overlay,
          report=_report if folder_mode else _raise,
          progress=(lambda done, total: bar.update(done)) if folder_mode else None)
  if failures:
    total = len(jobs) + len(problems)
    raise SystemExit(f"error: {failures} of {total} composites failed (see above); the others "
                     f"are in {f.out}")


def predict_video(f: flags.FlagValues) -> None:
  if f.fg_bg is not None or f.bg_dir is not None or f.fg_bg_dir is not None:
    raise errors.UserError("--video takes one --bg (the plate); not --fg_bg, --bg_dir or "
                           "--fg_bg_dir")
  if f.bg is None:
    raise errors.UserError("--video needs --bg: a photo of the empty scene from the same camera")
  name = os.path.splitext(os.path.basename(f.video))[0]
  paths = video.output_paths(f.out, name, f.png_frames)
  video.check_outputs(paths, f.overwrite)
  # The plate and the video are checked before the model loads.
  with video.VideoReader(f.video) as clip:
    plate = video.load_plate(f.bg, clip)
    predictor = load_predictor(f)
    result = video.predict_video(predictor, plate, clip, f.out, name=name,
                                 png_frames=f.png_frames, lossless=f.lossless,
                                 overwrite=f.overwrite)
  print(f"Wrote {', '.join(result.paths.values())}.", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, predict_files, argv, program="dmjax-predict")


if __name__ == "__main__":
  main()
