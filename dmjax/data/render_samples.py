r"""Renders synthetic examples to PNG files and one contact sheet, to look at the data.

  python -m dmjax.data.render_samples --out=/tmp/samples --split=train --num=8 --resolution=192

Writes, per example, `{split}_{index:05d}_{bg,fg_bg,mask}.png` and `..._depth.png` (the uint16
depth codes of `dmjax.data.schema` as a 16-bit grayscale PNG), and `samples.png`: one column per
example, rows bg, fg_bg, mask and depth colour-mapped (dark blue near, yellow far; the scale runs
from 0 to SYNTHETIC_MAX_DEPTH_M). Existing files are left alone unless --overwrite is given.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from dmjax.data import schema, synthetic

_OUT = flags.DEFINE_string("out", None, "Folder to write the PNG files to (created if missing).")
_SPLIT = flags.DEFINE_enum("split", "train", synthetic.SPLITS, "Split to render.")
_NUM = flags.DEFINE_integer("num", 8, "Number of examples, starting at --start.")
_START = flags.DEFINE_integer("start", 0, "Index of the first example.")
_RESOLUTION = flags.DEFINE_integer("resolution", 192, "Side of the rendered images in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed (data.synthetic.seed).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace files that already exist.")

# Control points of a perceptually ordered colour map from dark blue through green to yellow.
_COLORMAP_POINTS = np.array([
    (0.00, 0.27, 0.00, 0.33),
    (0.25, 0.23, 0.32, 0.55),
    (0.50, 0.13, 0.57, 0.55),
    (0.75, 0.37, 0.79, 0.38),
    (1.00, 0.99, 0.91, 0.14),
])
_GAP = 2  # Pixels between the tiles of the contact sheet.


def colormap(values: np.ndarray) -> np.ndarray:
  """uint8 RGB (..., 3) for values in [0, 1], linear between the control points."""
  values = np.clip(values, 0, 1)
  channels = [np.interp(values, _COLORMAP_POINTS[:, 0], _COLORMAP_POINTS[:, c])
              for c in (1, 2, 3)]
  return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def depth_image(depth: np.ndarray) -> np.ndarray:
  return colormap(depth[..., 0].astype(np.float32) / schema.DEPTH_MAX_CODE)


def contact_sheet(examples: list[dict[str, np.ndarray]]) -> np.ndarray:
  """One column per example; rows bg, fg_bg, mask and colour-mapped depth."""
  rows = []
  for example in examples:
    rows.append([example["bg"], example["fg_bg"], np.repeat(example["mask"], 3, axis=-1),
                 depth_image(example["depth"])])
  size = examples[0]["bg"].shape[0]
  columns, tiles = len(examples), 4
  sheet = np.full((tiles * size + (tiles - 1) * _GAP, columns * size + (columns - 1) * _GAP, 3),
                  255, np.uint8)
  for column, images in enumerate(rows):
    for row, image in enumerate(images):
      top, left = row * (size + _GAP), column * (size + _GAP)
      sheet[top:top + size, left:left + size] = image
  return sheet


def main(argv):
  del argv
  if _NUM.value < 1:
    sys.exit("render_samples: --num must be at least 1")
  indices = range(_START.value, _START.value + _NUM.value)
  outputs = {}
  for index in indices:
    for key in schema.KEYS:
      outputs[(index, key)] = os.path.join(_OUT.value, f"{_SPLIT.value}_{index:05d}_{key}.png")
  sheet_path = os.path.join(_OUT.value, "samples.png")
  existing = [p for p in [*outputs.values(), sheet_path] if os.path.exists(p)]
  if existing and not _OVERWRITE.value:
    sys.exit(f"render_samples: {existing[0]} already exists ({len(existing)} files would be "
             "replaced); pass --overwrite to replace them")
  os.makedirs(_OUT.value, exist_ok=True)
  examples = []
  for index in indices:
    example = synthetic.render_example(_SPLIT.value, index, resolution=_RESOLUTION.value,
                                       seed=_SEED.value)
    examples.append(example)
    for key in schema.KEYS:
      image = example[key]
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(outputs[(index, key)])
  Image.fromarray(contact_sheet(examples)).save(sheet_path, optimize=True)
  print(f"wrote {len(outputs) + 1} files to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
