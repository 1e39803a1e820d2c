r"""Renders synthetic examples to PNG files and one contact sheet, to look at the data.

  python -m dmjax.data.render_samples --out=/tmp/samples --split=train --num=8 --resolution=192

Writes, per example, `{split}_{index:05d}_{bg,fg_bg,mask}.png` and `..._depth.png` (the uint16
depth codes of `dmjax.data.schema` as a 16-bit grayscale PNG), and `samples.png`: one column per
example, rows bg, fg_bg, mask and depth colour-mapped (`dmjax.visualize.colorize`: dark near,
bright far; the scale runs from 0 to SYNTHETIC_MAX_DEPTH_M). Existing files are left alone unless
--overwrite is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image

from dmjax import cli, errors, visualize
from dmjax.data import schema, synthetic


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("out", None, "Folder to write the PNG files to (created if missing).",
                      flag_values=f, required=True)
  flags.DEFINE_enum("split", "train", synthetic.SPLITS, "Split to render.", flag_values=f)
  flags.DEFINE_integer("num", 8, "Number of examples, starting at --start.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_integer("start", 0, "Index of the first example.", flag_values=f)
  flags.DEFINE_integer("resolution", 192, "Side of the rendered images in pixels.",
                       flag_values=f)
  flags.DEFINE_integer("seed", 0, "Dataset seed (data.synthetic.seed).", flag_values=f)
  flags.DEFINE_bool("overwrite", False, "Replace files that already exist.", flag_values=f)


def contact_sheet(examples: list[dict[str, np.ndarray]]) -> np.ndarray:
  """One column per example; rows bg, fg_bg, mask and colour-mapped depth."""
  columns = [[example["bg"], example["fg_bg"], np.repeat(example["mask"], 3, axis=-1),
              visualize.colorize(example["depth"][..., 0] / schema.DEPTH_MAX_CODE)]
             for example in examples]
  return visualize.tile_grid([list(row) for row in zip(*columns, strict=True)])


def render_samples(f: flags.FlagValues) -> None:
  indices = range(f.start, f.start + f.num)
  outputs = {(index, key): os.path.join(f.out, f"{f.split}_{index:05d}_{key}.png")
             for index in indices for key in schema.KEYS}
  sheet_path = os.path.join(f.out, "samples.png")
  existing = [p for p in [*outputs.values(), sheet_path] if os.path.exists(p)]
  if existing and not f.overwrite:
    raise errors.UserError(f"{existing[0]} already exists ({len(existing)} files would be "
                           "replaced); pass --overwrite to replace them")
  os.makedirs(f.out, exist_ok=True)
  examples = []
  for index in indices:
    example = synthetic.render_example(f.split, index, resolution=f.resolution, seed=f.seed)
    examples.append(example)
    for key in schema.KEYS:
      image = example[key]
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(outputs[(index, key)])
  Image.fromarray(contact_sheet(examples)).save(sheet_path, optimize=True)
  print(f"wrote {len(outputs) + 1} files to {f.out}")


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, render_samples, argv, program="dmjax.data.render_samples")


if __name__ == "__main__":
  main()
