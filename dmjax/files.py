"""Files and folders written atomically: a temporary one beside the target, then a rename. A
reader (or the next run after a crash) sees the old one or the new one, never half of one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
  """A temporary folder beside `path`, put in its place (replacing what was there) only when
  the block completes."""
  parent = os.path.dirname(path) or "."
  partial = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
  try:
    yield partial
    if os.path.exists(path):  # --overwrite: the old folder goes only once the new one is whole.
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
      os.replace(path, os.path.join(old, "replaced"))
      os.replace(partial, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(partial, path)
  finally:
    shutil.rmtree(partial, ignore_errors=True)


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
