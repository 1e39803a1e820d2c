"""Files written atomically: a temporary file beside the target, then a rename. A reader (or the
next run after a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from typing import IO

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
  """`open(path, mode)` for writing, renamed into place only when the block completes."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, data: dict) -> None:
  with atomic_open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)


def png_bytes(image: np.ndarray) -> bytes:
  """An image (uint8 or uint16; (H, W), (H, W, 1), (H, W, 3)) as PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
      buffer, format="PNG")
  return buffer.getvalue()


def write_png(path: str, image: np.ndarray) -> None:
  with atomic_open(path) as f:
    f.write(png_bytes(image))
