r"""Writes built-in scenes in the seed dataset's layout, composited the seed's way.

  python -m dmjax.data.write_seed_layout --out=/tmp/seed_style --num_backgrounds=40 \
      --per_background=50 --resolution=192

The seed dataset (SPEC §4) pasted cut-outs onto background photos, so its fg_bg equals its bg
outside the object up to JPEG noise, and one bg file serves every composite made on it. This
writes the same: background b is the empty room of training room b - 1 photographed once, and
composite i on it is that photo with the object of synthetic training scene `b - 1 + 200·i` (the
same room) pasted in by its alpha mask; no shadow, exposure, alignment or noise differences.
Files: `bg/room_BBB.jpg`, `bg_fg/bgfg_bBBB_f001_I.jpg`, `mask/mask_...`, `depth/densedepth_...`
(8-bit, 0 = nearest, JPEG quality 75 as the seed's). `--config.data.dir=OUT` with
`configs/r64.py:data=seed` trains on it. Existing files are refused unless --overwrite.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from dmjax import files
from dmjax.data import schema, synthetic

_OUT = flags.DEFINE_string("out", None, "Folder to write the layout to (created if missing).")
_NUM_BACKGROUNDS = flags.DEFINE_integer("num_backgrounds", 40, "Backgrounds (rooms), at most 200.")
_PER_BACKGROUND = flags.DEFINE_integer("per_background", 50, "Composites on each background.")
_RESOLUTION = flags.DEFINE_integer("resolution", 192, "Side of the images (the seed's: 192).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace files that already exist.")

# Everything that makes two shots differ besides the object, off: a pasted cut-out.
PASTED = synthetic.Realism(max_shift_px_at_80=0.0, nudge_probability=0.0, jitter_px_at_80=0.0,
                           exposure_mismatch=0.0, white_balance_mismatch=0.0, lighting_tilt=0.0,
                           noise_levels=(0.0, 0.0), blur_probability=0.0, shadow_strength=0.0)


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def seed_style_files(background: int, count: int, resolution: int) -> dict[str, bytes]:
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


def main(argv):
  del argv
  if not 1 <= _NUM_BACKGROUNDS.value <= synthetic.NUM_ROOMS["train"]:
    raise app.UsageError(f"--num_backgrounds must be 1 to {synthetic.NUM_ROOMS['train']}")
  for background in range(1, _NUM_BACKGROUNDS.value + 1):
    for path, data in seed_style_files(background, _PER_BACKGROUND.value,
                                       _RESOLUTION.value).items():
      path = os.path.join(_OUT.value, path)
      if os.path.exists(path) and not _OVERWRITE.value:
        raise SystemExit(f"error: {path}: exists; pass --overwrite to replace it")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with files.atomic_open(path) as f:
        f.write(data)
    print(f"\rwrite_seed_layout: {background}/{_NUM_BACKGROUNDS.value} backgrounds", end="",
          file=sys.stderr, flush=True)
  print(file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main)
