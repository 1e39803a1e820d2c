"""Mask and depth for your own photo pairs, with a trained run.

  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg=COMPOSITE.jpg --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg_dir=BGS --fg_bg_dir=COMPOSITES --out=OUTDIR
  python -m dmjax.predict --workdir=DIR --bg=BG.jpg --fg_bg_dir=COMPOSITES --out=OUTDIR

In folders, composites pair with the background of the same name (extension aside), or all with
the one `--bg`. For each composite NAME this writes NAME_mask.png, NAME_depth.png (16-bit, 0 =
nearest), NAME_depth_color.png and, with --overlay, NAME_overlay.png, at the composite's own size
(`dmjax.inference.photos`).

Any size and any format PIL reads (grayscale, RGBA and 16-bit images become RGB; EXIF rotation
is applied). `--fit=auto` (default) predicts at the photo's own size: the model at a working
size where objects look as in training, then the run's refiner in 2x steps up to the photo
(`dmjax.inference.Predictor`); `--fit=resize` squeezes each pair to the run's square resolution
and the outputs back; `--fit=pad` runs the fully convolutional model at the image's own size.
Existing outputs are never replaced without `--overwrite`.
Bad input (an unreadable file, sizes that differ, a missing partner, an existing output) is
reported on one line naming the file; in folders the rest still runs, and the exit status is 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import flags

from dmjax import cli, errors
from dmjax.inference import FITS, Predictor, photos


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=f, required=True)
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
  flags.DEFINE_enum("fit", "auto", FITS, "auto: at the photo's own size, refined in 2x steps; "
                    "resize: squeezed to the run's resolution; pad: the model at the photo's size.",
                    flag_values=f)
  flags.DEFINE_integer("batch_size", 8, "Pairs per model call.", lower_bound=1, flag_values=f)


def _progress_printer(stream) -> Callable[[int, int], None]:
  def show(done: int, total: int) -> None:
    end = "\n" if done == total or not stream.isatty() else ""
    print(f"\rpredict: {done}/{total} composites", end=end, file=stream, flush=True)

  return show


def _report(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def _raise(message: str) -> None:
  raise errors.UserError(message)


def predict_files(f: flags.FlagValues) -> None:
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
    predictor = Predictor.from_workdir(f.workdir, step=f.step, fit=f.fit,
                                       batch_size=f.batch_size)
    os.makedirs(f.out, exist_ok=True)
    failures += photos.predict_jobs(
        predictor, jobs, f.out, overwrite=f.overwrite, overlay=f.overlay,
        report=_report if folder_mode else _raise,
        progress=_progress_printer(sys.stderr) if folder_mode else None)
  if failures:
    total = len(jobs) + len(problems)
    raise SystemExit(f"error: {failures} of {total} composites failed (see above); the others "
                     f"are in {f.out}")


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, predict_files, argv, program="dmjax-predict")


if __name__ == "__main__":
  main()
