"""Evaluates a run's checkpoint on a held-out split, beside the two data baselines.

  python -m dmjax.evaluate --workdir=DIR [--split=test] [--step=N] [--output=FILE.json]
  python -m dmjax.evaluate --workdir=DIR --data_dir=/data/cats   # the original layout

The latest (or `--step`) checkpoint is restored with the config saved beside it, which names the
model and the data; `--data_dir` swaps the data for the original layout (SPEC §4) in that
folder or zip, built on first use into `--tfds_dir` (default: the run's). Reported, over every
example of the split: the whole metric collection of `dmjax.evaluation.metrics`,
`mask_boundary_f` (the per-image mean of `metrics.boundary_f_score`), and all of them again for
the baselines (`baseline_` prefix).

When the data is not the dataset the run trained on (its checkpoint names it), a line before
the table says how they differ (`dmjax.evaluation.trained_data`): for the original layout, the
composites new since and how many of the split's composites were the run's training ones.

Written: the JSON (default WORKDIR/eval_SPLIT_STEP.json) with the metrics and the ranks of the
worst and best examples; beside it a PNG contact sheet of those examples (the worst first; the
columns of `visualize.example_grid`); TensorBoard scalars and the sheet under `evaluate/SPLIT/`
in WORKDIR. Examples are ranked by an error (`--rank_by`, see `split.EXAMPLE_ERRORS`).

  python -m dmjax.evaluate --workdir=DIR --resolution=192,512,1024 [--fit=auto]

scores held-out synthetic scenes rendered at each size instead, predicted as `dmjax.predict`
would and scored at full resolution (`dmjax.evaluation.resolutions`).

This is a single-process tool: it uses every local device, and fetches predictions to the host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from dmjax import cli, errors, files, inference, progress
from dmjax.evaluation import metrics as metrics_lib
from dmjax.evaluation import resolutions as resolutions_lib
from dmjax.evaluation import split as split_lib


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=f, required=True)
  flags.DEFINE_string("split", "test", "The split to evaluate.", flag_values=f)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=f)
  flags.DEFINE_string("output", None, "The JSON to write (default "
                      "WORKDIR/eval_SPLIT_STEP.json).", flag_values=f)
  flags.DEFINE_string("data_dir", "", "Evaluate on the original layout in this folder or zip "
                      "instead.", flag_values=f)
  flags.DEFINE_string("tfds_dir", None, "Where built datasets live (default: the run's "
                      "config).", flag_values=f)
  flags.DEFINE_integer("num_examples", -1, "First N examples; -1: all (64 with --resolution).",
                       flag_values=f)
  flags.DEFINE_integer("batch_size", None, "Evaluation batch size (default: the run's "
                       "eval_batch_size).", flag_values=f)
  flags.DEFINE_integer("num_kept", 4, "Worst and best examples each in the contact sheet; 0: no "
                       "sheet.", flag_values=f)
  flags.DEFINE_enum("rank_by", "combined", sorted(split_lib.EXAMPLE_ERRORS),
                    "The per-example error that ranks them.", flag_values=f)
  flags.DEFINE_string("resolution", "", "Comma-separated sizes, e.g. 192,512,1024: score "
                      "held-out synthetic scenes rendered at each size, at full resolution, "
                      "predicted as dmjax.predict would (--fit), instead of the split.",
                      flag_values=f)
  flags.DEFINE_enum("fit", "auto", inference.FITS, "With --resolution: how photos meet the model "
                    "(see dmjax.predict).", flag_values=f)
  flags.DEFINE_bool("clean_mask", True, inference.CLEAN_MASK_HELP, flag_values=f)


def evaluate_at_resolutions(f: flags.FlagValues) -> None:
  try:
    sizes = [int(r) for r in f.resolution.split(",")]
  except ValueError:
    raise errors.UserError(f"--resolution={f.resolution!r}: expected sizes like 192,512") from None
  num_examples = 64 if f.num_examples < 0 else f.num_examples
  predictor = inference.Predictor.from_workdir(f.workdir, step=f.step, fit=f.fit, batch_size=1,
                                               clean_mask=f.clean_mask)
  with progress.Progress(f"evaluate at {f.resolution} px", total=len(sizes) * num_examples,
                         unit="scenes") as bar:
    results = resolutions_lib.evaluate_at_resolutions(
        predictor, sizes, num_examples=num_examples,
        scene_seed=int(predictor.config.data.synthetic.seed),
        progress=lambda size, done, total: bar.update(sizes.index(size) * total + done))
  sizes_name = "-".join(map(str, sizes))  # Runs at other sizes keep their own files.
  policy = f.fit if f.clean_mask or f.fit != "auto" else "auto_uncleaned"
  output = f.output or os.path.join(
      f.workdir, f"eval_resolutions_{sizes_name}_{policy}_{predictor.step}.json")
  files.write_json(output, {"workdir": os.path.abspath(f.workdir), "step": predictor.step,
                            "fit": f.fit, "clean_mask": f.clean_mask,
                            "metrics": {str(r): m for r, m in results.items()}})
  print(f"{f.workdir} step {predictor.step}, fit={f.fit}"
        f"{'' if f.clean_mask else ' --noclean_mask'}, {num_examples} held-out "
        "synthetic scenes at each size:")
  print(resolutions_lib.format_resolution_table(results))
  print(f"Wrote {output}")


def evaluate_split(f: flags.FlagValues) -> None:
  result = split_lib.evaluate_checkpoint(
      f.workdir, step=f.step, split=f.split, num_examples=f.num_examples, data_dir=f.data_dir,
      tfds_dir=f.tfds_dir, batch_size=f.batch_size, num_kept=f.num_kept, rank_by=f.rank_by)
  output, sheet_path = split_lib.write_outputs(result, f.workdir, f.output)
  model_keys = [k for k in result.metrics if not k.startswith("baseline_")]
  for note in result.notes():  # Other data than the run trained on, and which.
    print(f"Note: {note}.")
  print(f"{f.workdir} step {result.step}, {result.split} split, "
        f"{result.tally.num_seen} examples:")
  print(metrics_lib.format_table(result.metrics, keys=model_keys))
  print(f"Wrote {output}" + (f" and {sheet_path}" if result.tally.worst is not None else ""))


def evaluate(f: flags.FlagValues) -> None:
  if f.resolution:
    evaluate_at_resolutions(f)
  else:
    evaluate_split(f)


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, evaluate, argv, program="dmjax-evaluate")


if __name__ == "__main__":
  main()
