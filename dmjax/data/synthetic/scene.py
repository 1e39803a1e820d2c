"""The entry points: which room and random stream example `index` of a split uses, and
`render_example` / `render_scene`. Rendered rooms are cached per process, only as a speed-up.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from dmjax import errors
from dmjax.data.synthetic.composite import (
  DEFAULT_REALISM,
  Realism,
  SyntheticScene,
  render_composite,
)
from dmjax.data.synthetic.rooms import room_layout
from dmjax.data.synthetic.shading import RoomImage, render_room

SPLITS = ("train", "test")
NUM_ROOMS = {"train": 200, "test": 50}
_TEST_ROOM_OFFSET = 1_000_000
_EXAMPLE_STREAM = 2
_ROOM_CACHE_BYTES = 192 << 20
_MIN_RESOLUTION = 16


def room_seed(split: str, index: int, *, seed: int = 0) -> int:
  """The room (background and camera) of example `index`; train and test seeds are disjoint.

  `seed` selects the dataset: with a different seed, the same room seed is a different room.
  """
  del seed  # Room seeds are numbered per split; `seed` changes what each number renders.
  split_id = _split_id(split)
  if index < 0:
    raise errors.UserError(f"example index must be >= 0, got {index}")
  return split_id * _TEST_ROOM_OFFSET + index % NUM_ROOMS[split]


def render_example(split: str, index: int, *, resolution: int = 80, seed: int = 0,
                   realism: Realism = DEFAULT_REALISM) -> dict[str, np.ndarray]:
  """Example `index` of `split`: bg, fg_bg, mask, depth as in `dmjax.data.schema`."""
  return render_scene(split, index, resolution=resolution, seed=seed,
                      realism=realism).as_example()


def render_scene(split: str, index: int, *, resolution: int = 80, seed: int = 0,
                 realism: Realism = DEFAULT_REALISM) -> SyntheticScene:
  """Like `render_example`, with the room's geometry and the shadow map as well."""
  room = room_seed(split, index, seed=seed)
  if resolution < _MIN_RESOLUTION:
    raise errors.UserError(f"resolution must be >= {_MIN_RESOLUTION}, got {resolution}")
  if seed < 0:
    raise errors.UserError(f"seed must be >= 0, got {seed}")
  layout = room_layout(seed, room)
  room_image = _ROOM_CACHE.get((seed, room, resolution),
                               lambda: render_room(layout, resolution))
  rng = np.random.default_rng(np.random.SeedSequence(
      [seed, _EXAMPLE_STREAM, _split_id(split), index]))
  return render_composite(layout, room_image, room, resolution, rng, realism)


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise errors.UserError(f"unknown split {split!r}; expected one of {SPLITS}")
  return SPLITS.index(split)


class _RoomCache:
  """Least-recently-used rendered rooms, bounded in bytes; thread-safe."""

  def __init__(self, max_bytes: int):
    self._max_bytes = max_bytes
    self._entries: collections.OrderedDict[Any, RoomImage] = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()

  def get(self, key, build) -> RoomImage:
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        return self._entries[key]
    value = build()
    with self._lock:
      if key not in self._entries:
        self._entries[key] = value
        self._bytes += value.nbytes
        while self._bytes > self._max_bytes and len(self._entries) > 1:
          _, dropped = self._entries.popitem(last=False)
          self._bytes -= dropped.nbytes
    return value

  def clear(self):
    with self._lock:
      self._entries.clear()
      self._bytes = 0


_ROOM_CACHE = _RoomCache(_ROOM_CACHE_BYTES)
