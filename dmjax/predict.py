"""Mask and depth for your own photo pairs, with a trained run.

  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg=COMPOSITE.jpg --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg_dir=BGS --fg_bg_dir=COMPOSITES --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg_dir=COMPOSITES --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg=PLATE.jpg --video=CLIP.mp4 --out=OUTDIR
  python -m dmjax.predict --exported=MODEL.jaxexport ...   (a `dmjax.export` file, no model code)

In folders, composites pair with the background of the same name (extension aside), or all with
the one `--bg`; two composites whose names differ only in letter case are refused (their outputs
would collide on macOS and Windows). For each composite NAME this writes NAME_mask.png,
NAME_depth.png (16-bit, 0 = nearest), NAME_depth_color.png and, with --overlay,
NAME_overlay.png, with --cutout NAME_cutout.png (RGBA: the composite with the mask probability as
alpha), with --replace_bg=PHOTO NAME_replace_bg.png (the object over PHOTO, which is scaled to
cover the composite and its middle kept), all at the composite's own size
(`dmjax.inference.photos`). A video shot against a background plate (`--bg`, the empty scene
from the same camera) gives CLIP_mask.mp4 and CLIP_depth.mp4, and with --png_frames each frame's
PNGs in CLIP_mask/ and CLIP_depth/ (`dmjax.inference.video`; needs the `video` extra).

Any size and any format PIL reads (grayscale, RGBA and 16-bit images become RGB; EXIF rotation
is applied). `--fit=auto` (default) predicts at the photo's own size: the model on the whole
photo, then on a window around the object, each at the scale it was trained on
(`dmjax.inference.cascade`), then fills the mask's small holes and drops its stray pieces
(`--noclean_mask` does not); `--fit=resize` squeezes each pair to the run's square resolution
and the outputs back; `--fit=pad` runs the fully convolutional model at the image's own size.
Existing outputs are never replaced without `--overwrite`. A folder run resumes by default
(`--skip_existing`): a composite whose outputs all exist is skipped, one with some of them gets
the missing ones, so a rerun after Ctrl-C does only what is left; `--noskip_existing` refuses
existing outputs instead. One pair (`--fg_bg`) with existing outputs is refused.
Bad input (an unreadable file, sizes that differ, a missing partner, an existing output) is
reported on one line naming the file; so is a pair the model fails on (a model call that fails
is retried pair by pair). In folders the rest still runs, a summary line says how many were
written, skipped and failed, and the exit status is 1 if any failed. Pairs are read and predicted
a few at a time: at most --batch_size pairs and --max_batch_megapixels a model call. Refused:
float photos outside [0, 1] (API), pairs of two sizes, files that are not PNG, JPEG, WebP, TIFF,
BMP or GIF (HEIC with the `heif` extra).

Compiled programs are kept in JAX's persistent compilation cache (`--nocompilation_cache`: not),
so a second run compiles nothing the first compiled.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from absl import flags

from dmjax import cli, errors, progress
from dmjax.inference import CLEAN_MASK_HELP, FIT_HELP, FITS, Predictor, photos, video
from dmjax.inference.predictor import DEFAULT_MAX_BATCH_PIXELS


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
  flags.DEFINE_bool("cutout", False, "Also write NAME_cutout.png: RGBA, the composite with the "
                    "mask probability as alpha.", flag_values=f)
  flags.DEFINE_string("replace_bg", None, "A photo: also write NAME_replace_bg.png, the object "
                      "over it (scaled to cover the composite, its middle kept; soft mask).",
                      flag_values=f)
  flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=f)
  flags.DEFINE_bool("skip_existing", True, "Folders: skip a composite whose outputs exist and "
                    "write only the missing ones of the others (resume); --noskip_existing: an "
                    "existing output is an error.", flag_values=f)
  flags.DEFINE_enum("fit", "auto", FITS, FIT_HELP, flag_values=f)
  flags.DEFINE_bool("clean_mask", True, CLEAN_MASK_HELP, flag_values=f)
  flags.DEFINE_integer("batch_size", 8, "Most pairs per model call.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_float("max_batch_megapixels", DEFAULT_MAX_BATCH_PIXELS / 1e6,
                     "Most photo pixels per model call, in millions (a larger pair runs alone).",
                     lower_bound=0.0, flag_values=f)
  cli.define_compilation_cache_flag(f)
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
  cli.use_compilation_cache(f.compilation_cache)
  limits = {"batch_size": f.batch_size, "max_batch_pixels": round(f.max_batch_megapixels * 1e6)}
  if f.exported is None:
    return Predictor.from_workdir(f.workdir, step=f.step, fit=f.fit, clean_mask=f.clean_mask,
                                  **limits)
  if f.step is not None:
    raise errors.UserError("--step is for --workdir; an exported file holds one checkpoint")
  return Predictor.from_exported(f.exported, fit=f.fit, clean_mask=f.clean_mask, **limits)


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
  kinds = photos.output_kinds(overlay=f.overlay, cutout=f.cutout,
                              replace_bg=f.replace_bg is not None)
  skip_existing = f.skip_existing and folder_mode
  # Checked before the model loads: the new background, and one pair's files and outputs.
  new_bg = photos.read_image(f.replace_bg) if f.replace_bg is not None else None
  if not folder_mode:
    photos.outputs_to_write(photos.output_paths(f.out, jobs[0].name, kinds),
                            overwrite=f.overwrite)
    photos.load_pair(jobs[0])
  summary = photos.Summary(failed=len(problems))
  if jobs:
    predictor = load_predictor(f)
    os.makedirs(f.out, exist_ok=True)
    with (progress.Progress("predict", total=len(jobs), unit="composites") if folder_mode
          else contextlib.nullcontext()) as bar:
      done = photos.predict_jobs(
          predictor, jobs, f.out, kinds=kinds, overwrite=f.overwrite,
          skip_existing=skip_existing, new_bg=new_bg, report=_report if folder_mode else _raise,
          progress=(lambda done, total: bar.update(done)) if folder_mode else None)
    summary.written, summary.skipped = done.written, done.skipped
    summary.failed += done.failed
  total = len(jobs) + len(problems)
  if folder_mode:
    print(summary.line(total), file=sys.stderr, flush=True)
  if summary.failed:
    raise SystemExit(f"error: {summary.failed} of {total} composites failed (see above); the "
                     f"others are in {f.out}")


def predict_video(f: flags.FlagValues) -> None:
  if f.fg_bg is not None or f.bg_dir is not None or f.fg_bg_dir is not None:
    raise errors.UserError("--video takes one --bg (the plate); not --fg_bg, --bg_dir or "
                           "--fg_bg_dir")
  if f.bg is None:
    raise errors.UserError("--video needs --bg: a photo of the empty scene from the same camera")
  if f.cutout or f.replace_bg is not None:
    raise errors.UserError("--cutout and --replace_bg are for photos, not --video")
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
