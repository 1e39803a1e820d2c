r"""Writes built-in scenes in the original dataset's layout, composited the original's way.

  python -m dmjax.data.write_original_layout --out=/tmp/original_style --num_backgrounds=40 \
      --per_background=50 --resolution=192

The original dataset (SPEC §4) pasted cut-outs onto background photos, so its fg_bg equals its
bg outside the object up to JPEG noise, and one bg file serves every composite made on it. This
writes the same: background b is the empty room of training room b - 1 photographed once, and
composite i on it is that photo with the object of synthetic training scene `b - 1 + 200·i` (the
same room) pasted in by its alpha mask; no shadow, exposure, alignment or noise differences.
Files: `bg/room_BBB.jpg`, `bg_fg/bgfg_bBBB_f001_I.jpg`, `mask/mask_...`, `depth/densedepth_...`
(8-bit, 0 = nearest, JPEG quality 75 as the original's). `--config.data.dir=OUT` with
`configs/r64.py:data=original` trains on it. Existing files are refused unless --overwrite.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image

from dmjax import cli, errors, files
from dmjax.data import schema, synthetic

# Everything that makes two shots differ besides the object, off: a pasted cut-out.
PASTED = synthetic.Realism(max_shift_px_at_80=0.0, nudge_probability=0.0, jitter_px_at_80=0.0,
                           exposure_mismatch=0.0, white_balance_mismatch=0.0, lighting_tilt=0.0,
                           noise_levels=(0.0, 0.0), blur_probability=0.0, shadow_strength=0.0)


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv  # No config flag.
  flags.DEFINE_string("out", None, "Folder to write the layout to (created if missing).",
                      flag_values=f, required=True)
  flags.DEFINE_integer("num_backgrounds", 40,
                       f"Backgrounds (rooms), 1 to {synthetic.NUM_ROOMS['train']}.", flag_values=f)
  flags.DEFINE_integer("per_background", 50, "Composites on each background.", lower_bound=0,
                       flag_values=f)
  flags.DEFINE_integer("resolution", 192, "Side of the images (the original's: 192).",
                       flag_values=f)
  flags.DEFINE_bool("overwrite", False, "Replace files that already exist.", flag_values=f)


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def original_style_files(background: int, count: int, resolution: int) -> dict[str, bytes]:
  """{relative path: JPEG bytes} of background `background` (1-based) and its composites."""
  room = background - 1
  bg = synthetic.render_example("train", room, resolution=resolution, realism=PASTED)["bg"]
  contents = {f"bg/room_{background:03d}.jpg": _jpeg(bg)}
  for i in range(count):
    scene = synthetic.render_example("train", room + synthetic.NUM_ROOMS["train"] * i,
                                     resolution=resolution, realism=PASTED)
    alpha = scene["mask"].astype(np.float32) / 255.0
    fg_bg = np.round(bg * (1 - alpha) + scene["fg_bg"] * alpha).astype(np.uint8)
    depth = np.round(scene["depth"][..., 0] / schema.DEPTH_MAX_CODE * 255).astype(np.uint8)
    name = f"b{background:03d}_f001_{i}.jpg"
    contents[f"bg_fg/bgfg_{name}"] = _jpeg(fg_bg)
    contents[f"mask/mask_{name}"] = _jpeg(scene["mask"][..., 0])
    contents[f"depth/densedepth_{name}"] = _jpeg(depth, quality=75)
  return contents


def write_layout(out: str, num_backgrounds: int = 40, per_background: int = 50,
                 resolution: int = 192, overwrite: bool = False) -> None:
  """Writes the layout into `out`, each file atomically; refuses to replace a file unless
  `overwrite`."""
  if not 1 <= num_backgrounds <= synthetic.NUM_ROOMS["train"]:
    raise errors.UserError(f"--num_backgrounds={num_backgrounds}: expected 1 to "
                           f"{synthetic.NUM_ROOMS['train']}")
  for background in range(1, num_backgrounds + 1):
    for path, data in original_style_files(background, per_background, resolution).items():
      path = os.path.join(out, path)
      if os.path.exists(path) and not overwrite:
        raise errors.UserError(f"{path}: exists; pass --overwrite to replace it")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with files.atomic_open(path) as f:
        f.write(data)
    print(f"\rwrite_original_layout: {background}/{num_backgrounds} backgrounds", end="",
          file=sys.stderr, flush=True)
  print(file=sys.stderr)


def _main(f: flags.FlagValues) -> None:
  write_layout(f.out, f.num_backgrounds, f.per_background, f.resolution, f.overwrite)


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, _main, argv, program="python -m dmjax.data.write_original_layout")


if __name__ == "__main__":
  main()
