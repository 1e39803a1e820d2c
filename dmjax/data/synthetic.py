"""Built-in synthetic scenes: a numpy renderer of (bg, fg_bg, mask, depth) quartets.

A scene is an indoor room seen through one camera model, with an animal-like object standing on
its floor. Everything is drawn with exact labels and no download:

* Rooms are axis-aligned boxes (floor, four walls, ceiling) holding furniture-like boxes, with
  windows, doors, pictures and rugs, procedurally textured and lit by one ceiling lamp. A room
  seed also fixes the camera: a square pinhole image with a FIELD_OF_VIEW_DEG field of view on
  both axes, 1.0-1.8 m above the floor, looking into the room with a random heading and tilted
  5-25 degrees down. One camera model for all images, as in a real dataset from one camera, makes
  absolute depth learnable from a single image.
* Depth is z-depth: the distance along the optical axis (what a depth sensor reports), not the
  Euclidean distance along the pixel's ray. It is ray cast against the geometry at pixel centres
  of fg_bg, so it is exact for the composite, and stored per `dmjax.data.schema` as
  round(clip(z / SYNTHETIC_MAX_DEPTH_M, 0, 1) * 65535).
* The object is a cut-out facing the camera, a smooth union of superellipses with wobbly
  outlines, tapered capsules and triangles (body, head, ears, legs, tail), with a rounded depth
  profile and textured fur. It stands on the floor: a visible floor point and a height in metres
  are drawn and projected, so its size in the image follows its depth. Furniture in front of it
  hides it, in the mask too. It casts a soft shadow from the lamp and a contact shadow; both
  darken fg_bg but are not part of the mask. The mask is the object's alpha (soft edges); the
  depth label takes the object's depth where the mask is at least 128 and the room's elsewhere.
* bg and fg_bg are two shots of the room: independent exposure, white balance, sensor noise,
  blur and JPEG quality, a smooth lighting change on fg_bg, and bg shifted by up to
  MAX_SHIFT_PX_AT_80 pixels (scaled with the resolution) with subpixel precision. Some objects are
  coloured like the background behind them. The labels are exact for fg_bg.

Splits: example i of a split uses room i mod NUM_ROOMS[split]; the test split's rooms come from
seeds that the training split never draws (`room_seed`), so its backgrounds are unseen. Many
composites share a room and its camera, as the seed dataset's composites share 100 background
photos. An example depends only on (split, index, resolution, seed): its random generator is
seeded from them, and rendered rooms are cached per process only as a speed-up.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import io
import math
import threading
from typing import Any

import numpy as np
from PIL import Image

from dmjax import errors
from dmjax.data import schema

SPLITS = ("train", "test")
NUM_ROOMS = {"train": 200, "test": 50}
FIELD_OF_VIEW_DEG = 60.0
CAMERA_HEIGHT_RANGE_M = (1.0, 1.8)
MAX_SHIFT_PX_AT_80 = 3.0

# Surface codes of the ray caster; box k of a room is surface FIRST_BOX + k.
FLOOR, CEILING = 0, 1
WALL_X0, WALL_X1, WALL_Y0, WALL_Y1 = 2, 3, 4, 5
FIRST_BOX = 6

_TEST_ROOM_OFFSET = 1_000_000
_ROOM_STREAM = 1
_EXAMPLE_STREAM = 2
_ROOM_CACHE_BYTES = 192 << 20
_NOISE_SIZE = 64  # Side of the value-noise lattice; a power of two so indices wrap with `&`.
_MIN_RESOLUTION = 16
# Objects are placed on a grid of floor cells of this many rows and columns, and image margins are
# fractions of the image, so an example shows the same scene at every resolution.
_PLACEMENT_GRID = 64
_EDGE = 1 / 80  # Margin objects keep from the image border, as a fraction of its side.
# Share of examples framed as a close-up: the object stands nearer than the bottom of the frame,
# so its feet or sides may be cut off and it can fill most of the image (photos of a pet).
CLOSEUP_PROBABILITY = 0.25
_CLOSEUP_HEIGHT_GAIN = (1.2, 2.2)  # Close-up objects are drawn this much taller.


# --------------------------------------------------------------------------------------------
# Public API.


@dataclasses.dataclass(frozen=True)
class Realism:
  """How bg and fg_bg differ besides the object; the defaults make the built-in dataset.

  Changing these changes only how the two shots look: rooms, objects and labels stay the same,
  as the random draws are made whatever the values.
  """

  # Misalignment of bg, in pixels at 80 px (scaled with the resolution): most pairs are aligned
  # to within `jitter_px_at_80`; a `nudge_probability` share is off by 1 to `max_shift_px_at_80`.
  max_shift_px_at_80: float = MAX_SHIFT_PX_AT_80  # At most the default.
  nudge_probability: float = 0.1
  jitter_px_at_80: float = 0.3
  exposure_mismatch: float = 0.07  # fg_bg / bg exposure ratio in [1 - x, 1 + x].
  white_balance_mismatch: float = 0.03  # Std of each shot's per-channel log gain.
  lighting_tilt: float = 0.08  # Largest brightness slope across fg_bg (a light moved).
  noise_levels: tuple[float, float] = (1.0, 6.0)  # Range of the sensor noise std, 8-bit steps.
  jpeg_quality: tuple[int, int] = (40, 95)  # Range of each shot's JPEG quality, inclusive.
  blur_probability: float = 0.3  # Chance of a slight blur, per shot.
  shadow_strength: float = 1.0  # Scales the darkening of the object's shadows.
  camouflage_probability: float = 0.15  # Chance the object takes the colour behind it.

  def __post_init__(self):
    if not 0 <= self.jitter_px_at_80 <= self.max_shift_px_at_80 <= MAX_SHIFT_PX_AT_80:
      raise ValueError("need 0 <= jitter_px_at_80 <= max_shift_px_at_80 <= "
                       f"{MAX_SHIFT_PX_AT_80}, got {self}")


DEFAULT_REALISM = Realism()


@dataclasses.dataclass(frozen=True)
class SyntheticScene:
  """One rendered example with the extra ground truth that tests and debugging look at."""

  bg: np.ndarray  # uint8 (R, R, 3)
  fg_bg: np.ndarray  # uint8 (R, R, 3)
  mask: np.ndarray  # uint8 (R, R, 1)
  depth: np.ndarray  # uint16 (R, R, 1)
  room_seed: int
  room_depth_m: np.ndarray  # float32 (R, R): z-depth of the empty room in the fg_bg frame.
  surface: np.ndarray  # int16 (R, R): surface code of the empty room in the fg_bg frame.
  shadow: np.ndarray  # float32 (R, R): fraction of light the object's shadows took from fg_bg.
  contact_point_m: np.ndarray  # float64 (3,): where the object stands, room coordinates.
  object_height_m: float
  bg_shift_px: tuple[float, float]  # (rows, cols) offset at which bg samples the room.

  def as_example(self) -> dict[str, np.ndarray]:
    return {"bg": self.bg, "fg_bg": self.fg_bg, "mask": self.mask, "depth": self.depth}


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
                               lambda: _render_room(layout, resolution))
  rng = np.random.default_rng(np.random.SeedSequence(
      [seed, _EXAMPLE_STREAM, _split_id(split), index]))
  return _render_composite(layout, room_image, room, resolution, rng, realism)


def focal_length_px(resolution: int) -> float:
  return resolution / 2 / math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2)


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise errors.UserError(f"unknown split {split!r}; expected one of {SPLITS}")
  return SPLITS.index(split)


# --------------------------------------------------------------------------------------------
# Camera and room layout.


@dataclasses.dataclass(frozen=True)
class Camera:
  """A pinhole camera; room coordinates are x right, y into the room, z up, in metres."""

  position: np.ndarray
  right: np.ndarray
  down: np.ndarray
  forward: np.ndarray

  @classmethod
  def looking(cls, position, yaw: float, pitch: float, roll: float) -> Camera:
    """Heading `yaw` from +y towards +x, `pitch` down from horizontal, `roll` clockwise."""
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch),
                        -math.sin(pitch)])
    right = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
    down = np.cross(forward, right)
    cos, sin = math.cos(roll), math.sin(roll)
    right, down = cos * right + sin * down, cos * down - sin * right
    return cls(np.asarray(position, np.float64), right, down, forward)

  def rays(self, rows: np.ndarray, cols: np.ndarray, resolution: int) -> np.ndarray:
    """Ray directions (..., 3) float32 through image points given in pixels from the top-left
    corner; their forward component is 1, so the ray parameter of a hit is its z-depth."""
    focal = focal_length_px(resolution)
    x = ((np.asarray(cols, np.float32) - resolution / 2) / focal)[..., None]
    y = ((np.asarray(rows, np.float32) - resolution / 2) / focal)[..., None]
    return (x * self.right.astype(np.float32) + y * self.down.astype(np.float32)
            + self.forward.astype(np.float32))

  def project(self, points: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (rows, cols) in pixels of room points (..., 3) in front of the camera."""
    relative = np.asarray(points) - self.position
    z = relative @ self.forward
    focal = focal_length_px(resolution)
    return (relative @ self.down / z * focal + resolution / 2,
            relative @ self.right / z * focal + resolution / 2)


@dataclasses.dataclass(frozen=True)
class Material:
  """A procedural surface texture: `kind` picks the pattern, `scale` its size in metres."""

  kind: str  # "paint", "wood", "tiles", "carpet", "stripes", "fabric"
  colors: np.ndarray  # (n, 3) float32 albedos in [0, 1]
  scale: float = 0.2
  contrast: float = 0.1


@dataclasses.dataclass(frozen=True)
class Decoration:
  """A window, door or picture: a rectangle [u0, u1] x [v0, v1] on a wall (v = height)."""

  kind: str
  u0: float
  u1: float
  v0: float
  v1: float
  colors: np.ndarray  # (n, 3)


@dataclasses.dataclass(frozen=True)
class RoomLayout:
  size: np.ndarray  # (3,) width (x), length (y) and height (z) in metres.
  camera: Camera
  box_lo: np.ndarray  # (K, 3) furniture boxes, lower corners.
  box_hi: np.ndarray  # (K, 3) upper corners.
  box_materials: tuple[Material, ...]
  floor: Material
  ceiling: np.ndarray  # (3,)
  walls: tuple[Material, ...]  # x = 0, x = width, y = 0, y = length.
  decorations: tuple[tuple[Decoration, ...], ...]  # Per wall, as `walls`.
  rug: Decoration | None  # On the floor: u = x, v = y.
  lamp: np.ndarray  # (3,) position.
  lamp_color: np.ndarray  # (3,)
  lamp_falloff_m: float
  ambient: np.ndarray  # (3,)
  fill_direction: np.ndarray  # (3,) unit vector towards a window-like fill light.
  fill_color: np.ndarray  # (3,)
  brightness: float  # Mean image brightness the camera's exposure aims for.
  vignetting: float
  noise: np.ndarray  # (_NOISE_SIZE, _NOISE_SIZE) float32 lattice for the textures.


_WALL_PAINTS = np.array([
    (0.93, 0.91, 0.86), (0.88, 0.82, 0.70), (0.78, 0.78, 0.80), (0.72, 0.80, 0.88),
    (0.76, 0.85, 0.73), (0.93, 0.87, 0.66), (0.80, 0.56, 0.44), (0.28, 0.45, 0.50),
    (0.72, 0.62, 0.72), (0.95, 0.95, 0.95), (0.60, 0.62, 0.58), (0.85, 0.72, 0.72),
], np.float32)
_WOODS = np.array([
    (0.76, 0.60, 0.42), (0.46, 0.31, 0.20), (0.62, 0.58, 0.54), (0.62, 0.37, 0.25),
    (0.84, 0.74, 0.58), (0.32, 0.22, 0.15),
], np.float32)
_TILES = np.array([
    (0.92, 0.92, 0.90), (0.60, 0.61, 0.62), (0.85, 0.78, 0.66), (0.72, 0.42, 0.30),
    (0.25, 0.25, 0.27), (0.70, 0.78, 0.80),
], np.float32)
_FABRICS = np.array([
    (0.55, 0.55, 0.57), (0.80, 0.74, 0.64), (0.25, 0.32, 0.50), (0.35, 0.48, 0.35),
    (0.55, 0.25, 0.22), (0.20, 0.20, 0.22), (0.85, 0.62, 0.30), (0.62, 0.50, 0.62),
], np.float32)
_LIGHT_COLORS = np.array([(1.0, 0.88, 0.72), (1.0, 0.95, 0.88), (0.95, 0.97, 1.0)], np.float32)


def _jitter(rng: np.random.Generator, color: np.ndarray, amount: float) -> np.ndarray:
  tone = rng.uniform(1 - amount, 1 + amount)
  tint = rng.uniform(1 - amount / 2, 1 + amount / 2, 3)
  return np.clip(color * tone * tint, 0.02, 1.0).astype(np.float32)


def _pick(rng: np.random.Generator, palette: np.ndarray, amount: float = 0.12) -> np.ndarray:
  return _jitter(rng, palette[rng.integers(len(palette))], amount)


def _sample_floor(rng: np.random.Generator) -> Material:
  kind = rng.choice(["wood", "wood", "tiles", "carpet"])
  if kind == "wood":
    return Material("wood", _pick(rng, _WOODS)[None], rng.uniform(0.09, 0.22),
                    rng.uniform(0.1, 0.3))
  if kind == "tiles":
    first = _pick(rng, _TILES)
    second = _pick(rng, _TILES) if rng.random() < 0.3 else _jitter(rng, first, 0.05)
    grout = _jitter(rng, np.full(3, rng.choice([0.35, 0.8]), np.float32), 0.05)
    return Material("tiles", np.stack([first, second, grout]), rng.uniform(0.25, 0.6),
                    rng.uniform(0.03, 0.1))
  return Material("carpet", _pick(rng, _FABRICS, 0.2)[None], 0.05, rng.uniform(0.08, 0.2))


def _sample_wall(rng: np.random.Generator, paint: np.ndarray) -> Material:
  if rng.random() < 0.2:
    other = _jitter(rng, paint, 0.15) if rng.random() < 0.6 else _pick(rng, _WALL_PAINTS)
    return Material("stripes", np.stack([paint, other]), rng.uniform(0.08, 0.4), 0.03)
  return Material("paint", paint[None], 0.5, rng.uniform(0.01, 0.05))


def _sample_decorations(rng: np.random.Generator, wall_length: float,
                        room_height: float) -> tuple[Decoration, ...]:
  decorations: list[Decoration] = []
  for _ in range(rng.integers(0, 3)):
    kind = rng.choice(["window", "picture", "picture", "door"])
    if kind == "window":
      width, v0 = rng.uniform(0.7, 1.6), rng.uniform(0.7, 1.0)
      v1 = min(v0 + rng.uniform(1.0, 1.5), room_height - 0.2)
      sky = _jitter(rng, np.array([0.75, 0.85, 1.0], np.float32), 0.1)
      frame = _jitter(rng, np.full(3, 0.92, np.float32), 0.05)
      colors = np.stack([sky, frame])
    elif kind == "door":
      width, v0, v1 = rng.uniform(0.75, 0.95), 0.0, min(rng.uniform(2.0, 2.15), room_height - 0.1)
      colors = np.stack([_pick(rng, _WOODS) if rng.random() < 0.6 else _pick(rng, _WALL_PAINTS),
                         _jitter(rng, np.full(3, 0.9, np.float32), 0.05)])
    else:
      width = rng.uniform(0.3, 1.0)
      height = width * rng.uniform(0.6, 1.3)
      centre = rng.uniform(1.3, 1.7)
      v0, v1 = centre - height / 2, centre + height / 2
      colors = np.stack([_pick(rng, _FABRICS, 0.3), _pick(rng, _FABRICS, 0.3),
                         _pick(rng, _WOODS) if rng.random() < 0.5 else
                         _jitter(rng, np.full(3, 0.1, np.float32), 0.5)])
    if wall_length < width + 0.4:
      continue
    u0 = rng.uniform(0.2, wall_length - width - 0.2)
    if any(u0 < d.u1 + 0.1 and d.u0 < u0 + width + 0.1 for d in decorations):
      continue
    decorations.append(Decoration(str(kind), u0, u0 + width, v0, v1, colors))
  return tuple(decorations)


def _sample_furniture(rng: np.random.Generator, size: np.ndarray, camera_xy: np.ndarray):
  """Boxes standing on the floor, most against a wall; tables are a top and four legs."""
  width, length = size[0], size[1]
  footprints: list[tuple[float, float, float, float]] = []
  boxes: list[tuple[np.ndarray, np.ndarray, Material]] = []
  for _ in range(rng.integers(1, 5)):
    kind = rng.choice(["cabinet", "sofa", "table", "low"])
    along = {"cabinet": (0.5, 1.4), "sofa": (1.4, 2.4), "table": (0.8, 1.6),
             "low": (1.0, 2.0)}[kind]
    across = {"cabinet": (0.35, 0.6), "sofa": (0.8, 1.0), "table": (0.6, 1.0),
              "low": (0.4, 1.6)}[kind]
    box_along, box_across = rng.uniform(*along), rng.uniform(*across)
    wall = rng.integers(3) if kind != "table" or rng.random() < 0.5 else 3
    for _ in range(10):
      if wall in (0, 1):  # Left or right wall: the box runs along y.
        if length - box_along < 1.0:
          break
        y0 = rng.uniform(0.8, length - box_along)
        x0 = 0.0 if wall == 0 else width - box_across
        rect = (x0, x0 + box_across, y0, y0 + box_along)
      elif wall == 2:  # Far wall.
        if width < box_along + 0.1:
          break
        x0 = rng.uniform(0.0, width - box_along)
        rect = (x0, x0 + box_along, length - box_across, length)
      else:  # Free-standing.
        x0 = rng.uniform(0.3, max(0.31, width - box_along - 0.3))
        y0 = rng.uniform(1.5, max(1.51, length - box_across - 0.3))
        rect = (x0, x0 + box_along, y0, y0 + box_across)
      grown = (rect[0] - 0.9, rect[1] + 0.9, rect[2] - 0.9, rect[3] + 0.9)
      near_camera = grown[0] < camera_xy[0] < grown[1] and grown[2] < camera_xy[1] < grown[3]
      overlaps = any(rect[0] < f[1] + 0.05 and f[0] < rect[1] + 0.05 and rect[2] < f[3] + 0.05
                     and f[2] < rect[3] + 0.05 for f in footprints)
      if not near_camera and not overlaps and rect[1] <= width and rect[3] <= length:
        break
    else:
      continue
    if (wall in (0, 1) and length - box_along < 1.0) or (wall == 2 and width < box_along + 0.1):
      continue
    footprints.append(rect)
    x0, x1, y0, y1 = rect
    if kind == "table":
      material = Material("wood", _pick(rng, _WOODS)[None], rng.uniform(0.08, 0.15), 0.15)
      top = rng.uniform(0.7, 0.78)
      boxes.append((np.array([x0, y0, top - 0.04]), np.array([x1, y1, top]), material))
      leg = 0.05
      for lx, ly in ((x0, y0), (x1 - leg, y0), (x0, y1 - leg), (x1 - leg, y1 - leg)):
        boxes.append((np.array([lx, ly, 0.0]), np.array([lx + leg, ly + leg, top]), material))
      continue
    if kind == "sofa":
      material = Material("fabric", _pick(rng, _FABRICS, 0.2)[None], 0.05, 0.12)
      seat = rng.uniform(0.4, 0.5)
      boxes.append((np.array([x0, y0, 0.0]), np.array([x1, y1, seat]), material))
      back = 0.2
      back_rect = {0: (x0, x0 + back, y0, y1), 1: (x1 - back, x1, y0, y1),
                   2: (x0, x1, y1 - back, y1)}.get(int(wall), (x0, x1, y1 - back, y1))
      boxes.append((np.array([back_rect[0], back_rect[2], seat]),
                    np.array([back_rect[1], back_rect[3], rng.uniform(0.75, 0.95)]), material))
      continue
    height = rng.uniform(0.8, 2.0) if kind == "cabinet" else rng.uniform(0.3, 0.6)
    if rng.random() < 0.5:
      material = Material("wood", _pick(rng, _WOODS)[None], rng.uniform(0.1, 0.3), 0.1)
    else:
      material = Material("paint", _pick(rng, _WALL_PAINTS)[None], 0.5, 0.03)
    boxes.append((np.array([x0, y0, 0.0]), np.array([x1, y1, height]), material))
  if not boxes:
    return np.zeros((0, 3)), np.zeros((0, 3)), ()
  lo, hi, materials = zip(*boxes, strict=True)
  return np.stack(lo), np.stack(hi), tuple(materials)


@functools.lru_cache(maxsize=512)
def room_layout(seed: int, room: int) -> RoomLayout:
  """The geometry, materials, lights and camera of room seed `room` (see `room_seed`)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, _ROOM_STREAM, room]))
  size = np.array([rng.uniform(3.0, 7.0), rng.uniform(3.5, 8.5), rng.uniform(2.4, 3.2)])
  height = rng.uniform(*CAMERA_HEIGHT_RANGE_M)
  position = np.array([rng.uniform(0.25, 0.75) * size[0], rng.uniform(0.2, 0.9), height])
  # A heading whose horizontal line of sight runs at least 2.5 m before meeting a wall.
  for _ in range(20):
    yaw = math.radians(rng.uniform(-40.0, 40.0))
    direction = np.array([math.sin(yaw), math.cos(yaw)])
    reach = min(((size[0] if direction[0] > 0 else 0.0) - position[0]) / direction[0]
                if abs(direction[0]) > 1e-6 else np.inf,
                (size[1] - position[1]) / direction[1])
    if reach >= 2.5:
      break
  camera = Camera.looking(position, yaw, math.radians(rng.uniform(5.0, 25.0)),
                          math.radians(rng.normal(0.0, 1.0)))
  box_lo, box_hi, box_materials = _sample_furniture(rng, size, position[:2])
  paint = _pick(rng, _WALL_PAINTS, 0.08)
  walls = []
  for _ in range(4):
    accent = rng.random() < 0.15
    walls.append(_sample_wall(rng, _pick(rng, _WALL_PAINTS) if accent else paint))
  decorations = tuple(
      _sample_decorations(rng, size[1] if wall < 2 else size[0], size[2]) for wall in range(4))
  rug = None
  if rng.random() < 0.4:
    rug_size = rng.uniform([1.0, 0.8], [2.5, 2.0])
    corner = rng.uniform([0.2, 1.0], np.maximum([0.3, 1.1], size[:2] - rug_size - 0.2))
    rug = Decoration("rug", corner[0], corner[0] + rug_size[0], corner[1],
                     corner[1] + rug_size[1],
                     np.stack([_pick(rng, _FABRICS, 0.3), _pick(rng, _FABRICS, 0.3)]))
  lamp = np.array([rng.uniform(0.25, 0.75) * size[0], rng.uniform(0.3, 0.8) * size[1],
                   size[2] - rng.uniform(0.1, 0.6)])
  fill_angle = rng.uniform(0, 2 * math.pi)
  fill_direction = np.array([math.cos(fill_angle), math.sin(fill_angle), rng.uniform(0.0, 0.5)])
  return RoomLayout(
      size=size,
      camera=camera,
      box_lo=box_lo,
      box_hi=box_hi,
      box_materials=box_materials,
      floor=_sample_floor(rng),
      ceiling=_jitter(rng, np.full(3, 0.93, np.float32), 0.04),
      walls=tuple(walls),
      decorations=decorations,
      rug=rug,
      lamp=lamp,
      lamp_color=_LIGHT_COLORS[rng.integers(len(_LIGHT_COLORS))] * rng.uniform(1.2, 2.2),
      lamp_falloff_m=rng.uniform(1.5, 3.5),
      ambient=_jitter(rng, np.full(3, rng.uniform(0.3, 0.55), np.float32), 0.05),
      fill_direction=(fill_direction / np.linalg.norm(fill_direction)).astype(np.float32),
      fill_color=_LIGHT_COLORS[rng.integers(len(_LIGHT_COLORS))] * rng.uniform(0.0, 0.3),
      brightness=rng.uniform(0.45, 0.68),
      vignetting=rng.uniform(0.0, 0.35),
      noise=rng.random((_NOISE_SIZE, _NOISE_SIZE), dtype=np.float32),
  )


# --------------------------------------------------------------------------------------------
# Ray casting and shading of the empty room.


@dataclasses.dataclass(frozen=True)
class _Hits:
  depth: np.ndarray  # (N,) z-depth
  surface: np.ndarray  # (N,) int16
  points: np.ndarray  # (N, 3)
  normals: np.ndarray  # (N, 3)
  uv: np.ndarray  # (N, 2) texture coordinates on the surface, metres.


def _cast(layout: RoomLayout, directions: np.ndarray) -> _Hits:
  """Nearest hit of each ray (N, 3) from the camera; the camera is inside the room.

  Works on one array per axis: numpy reduces over a trailing axis of 3 many times slower.
  """
  origin = layout.camera.position.astype(np.float32)
  count = len(directions)
  components = np.ascontiguousarray(directions.T)  # (3, N)
  size = layout.size.astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    inverse = 1.0 / components
    # Leaving the room: per axis, the wall the ray moves towards.
    to_wall = [np.where(components[a] > 0, (size[a] - origin[a]) * inverse[a],
                        np.where(components[a] < 0, -origin[a] * inverse[a], np.inf))
               for a in range(3)]
    depth = np.minimum(np.minimum(to_wall[0], to_wall[1]), to_wall[2])
    axis = np.where(depth == to_wall[0], 0, np.where(depth == to_wall[1], 1, 2))
    positive = np.choose(axis, components) > 0
    surface = np.choose(axis, [np.where(positive, WALL_X1, WALL_X0),
                               np.where(positive, WALL_Y1, WALL_Y0),
                               np.where(positive, CEILING, FLOOR)]).astype(np.int16)
    normal_sign = np.where(positive, np.float32(-1), np.float32(1))
    if len(layout.box_lo):
      lo = (layout.box_lo.astype(np.float32) - origin).T[:, :, None] * inverse[:, None, :]
      hi = (layout.box_hi.astype(np.float32) - origin).T[:, :, None] * inverse[:, None, :]
      entry_axes = np.minimum(lo, hi)  # (3, K, N)
      leave_axes = np.maximum(lo, hi)
      entry = np.maximum(np.maximum(entry_axes[0], entry_axes[1]), entry_axes[2])
      leave = np.minimum(np.minimum(leave_axes[0], leave_axes[1]), leave_axes[2])
      box_depth = np.where((entry <= leave) & (entry > 0), entry, np.inf)
      box = np.argmin(box_depth, axis=0)
      nearest = np.take_along_axis(box_depth, box[None], 0)[0]
      in_front = nearest < depth
      if in_front.any():
        entered = [np.take_along_axis(entry_axes[a], box[None], 0)[0] for a in range(3)]
        box_axis = np.where(nearest == entered[0], 0, np.where(nearest == entered[1], 1, 2))
        depth = np.where(in_front, nearest, depth)
        axis = np.where(in_front, box_axis, axis)
        surface = np.where(in_front, FIRST_BOX + box, surface).astype(np.int16)
        facing = np.where(np.choose(box_axis, components) > 0, np.float32(-1), np.float32(1))
        normal_sign = np.where(in_front, facing, normal_sign)
  coordinates = origin[:, None] + depth * components  # (3, N)
  normals = np.zeros((3, count), np.float32)
  for a in range(3):
    normals[a] = np.where(axis == a, normal_sign, 0)
  # Texture coordinates: the two coordinates across the surface, height second on walls.
  u = np.choose(axis, [coordinates[1], coordinates[0], coordinates[0]])
  v = np.choose(axis, [coordinates[2], coordinates[2], coordinates[1]])
  return _Hits(depth, surface, coordinates.T, normals.T, np.stack([u, v], axis=1))


def _noise(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Smooth value noise in [0, 1] with unit lattice spacing, wrapping every table side."""
  mask = table.shape[0] - 1
  x_floor, y_floor = np.floor(x), np.floor(y)
  fx, fy = x - x_floor, y - y_floor
  fx = fx * fx * (3 - 2 * fx)
  fy = fy * fy * (3 - 2 * fy)
  x0 = x_floor.astype(np.int32) & mask
  y0 = y_floor.astype(np.int32) & mask
  x1 = (x0 + 1) & mask
  row0 = y0 * table.shape[1]
  row1 = ((y0 + 1) & mask) * table.shape[1]
  flat = table.ravel()  # `take` on flat indices is much faster than 2-D fancy indexing.
  top_left, bottom_left = flat.take(row0 + x0), flat.take(row1 + x0)
  top = top_left + (flat.take(row0 + x1) - top_left) * fx
  bottom = bottom_left + (flat.take(row1 + x1) - bottom_left) * fx
  return top + (bottom - top) * fy


def _fractal(table: np.ndarray, x: np.ndarray, y: np.ndarray, octaves: int = 3) -> np.ndarray:
  total, weight, norm = 0.0, 1.0, 0.0
  for octave in range(octaves):
    scale = 2.0**octave
    total = total + weight * _noise(table, x * scale + 17.3 * octave, y * scale + 5.1 * octave)
    norm += weight
    weight *= 0.5
  return total / norm


def _cell(table: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
  """A random value in [0, 1] per integer cell (i, j)."""
  mask = table.shape[0] - 1
  i = i.astype(np.int32)
  j = j.astype(np.int32)
  return table[i & mask, (j * 7 + i * 3 + 11) & mask]


def _material_albedo(material: Material, u: np.ndarray, v: np.ndarray,
                     table: np.ndarray) -> np.ndarray:
  colors = material.colors
  grain = _fractal(table, u / 0.3, v / 0.3) - 0.5
  if material.kind == "wood":
    width = material.scale
    plank = np.floor(u / width)
    along = v + _cell(table, plank, plank + 5) * 3.0
    board = np.floor(along / (width * 9))
    tone = 1 + material.contrast * (2 * _cell(table, plank, board) - 1)
    streaks = _noise(table, u / width * 6, along * 1.5) - 0.5
    across = u / width - plank
    seam = ((across < 0.05) | (along / (width * 9) - board < 0.01)).astype(np.float32)
    shade = tone * (1 + 0.25 * streaks + 0.1 * grain) * (1 - 0.35 * seam)
    return colors[0] * shade[:, None]
  if material.kind == "tiles":
    size = material.scale
    i, j = np.floor(u / size), np.floor(v / size)
    checker = ((i + j) % 2).astype(np.float32)[:, None]
    tile = colors[0] * (1 - checker) + colors[1] * checker
    tone = 1 + material.contrast * (2 * _cell(table, i, j) - 1) + 0.08 * grain
    fu, fv = u / size - i, v / size - j
    grout = ((np.minimum(fu, 1 - fu) < 0.03) | (np.minimum(fv, 1 - fv) < 0.03))[:, None]
    return np.where(grout, colors[2], tile * tone[:, None])
  if material.kind == "stripes":
    stripe = (np.floor(u / material.scale) % 2).astype(np.float32)[:, None]
    base = colors[0] * (1 - stripe) + colors[1] * stripe
    return base * (1 + material.contrast * grain)[:, None]
  if material.kind in ("carpet", "fabric"):
    fine = _noise(table, u / 0.02, v / 0.02) - 0.5
    return colors[0] * (1 + material.contrast * (fine + grain))[:, None]
  return colors[0] * (1 + material.contrast * 2 * grain)[:, None]  # paint


def _decoration_albedo(decoration: Decoration, u: np.ndarray, v: np.ndarray,
                       table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Albedo of the points inside the decoration, and whether they glow (windows)."""
  colors = decoration.colors
  du = np.minimum(u - decoration.u0, decoration.u1 - u)
  dv = np.minimum(v - decoration.v0, decoration.v1 - v)
  edge = np.minimum(du, dv)
  if decoration.kind == "window":
    mid_u = (decoration.u0 + decoration.u1) / 2
    height = (v - decoration.v0) / (decoration.v1 - decoration.v0)
    frame = (edge < 0.06) | (np.abs(u - mid_u) < 0.025)
    sky = colors[0] * (0.85 + 0.3 * height)[:, None]
    sky = sky + 0.15 * (_fractal(table, u / 0.4, v / 0.25) - 0.5)[:, None]
    albedo = np.where(frame[:, None], colors[1], sky)
    return albedo, ~frame
  if decoration.kind == "door":
    panel = (edge > 0.12) & (edge < 0.16)
    albedo = np.where((edge < 0.05)[:, None], colors[1], colors[0])
    albedo = albedo * np.where(panel, 0.85, 1.0)[:, None]
    return albedo, np.zeros(len(u), bool)
  if decoration.kind == "rug":
    border = edge < 0.12
    stripes = (np.floor(u / 0.15) % 2 == 0)
    inner = np.where(stripes[:, None], colors[0], colors[0] * 0.8 + colors[1] * 0.2)
    albedo = np.where(border[:, None], colors[1], inner)
    fine = _noise(table, u / 0.02, v / 0.02) - 0.5
    return albedo * (1 + 0.15 * fine)[:, None], np.zeros(len(u), bool)
  # Picture: a frame around a blurry two-colour painting.
  blend = _fractal(table, u / 0.15 + 3.0, v / 0.15, octaves=2)[:, None]
  painting = colors[0] * blend + colors[1] * (1 - blend)
  return np.where((edge < 0.04)[:, None], colors[2], painting), np.zeros(len(u), bool)


def _room_albedo(layout: RoomLayout, hits: _Hits) -> tuple[np.ndarray, np.ndarray]:
  table = layout.noise
  albedo = np.empty((len(hits.depth), 3), np.float32)
  glows = np.zeros(len(hits.depth), bool)
  u, v = hits.uv[:, 0], hits.uv[:, 1]

  def paint(selected: np.ndarray, material: Material, decorations=(), offset: float = 0.0):
    index = np.flatnonzero(selected)
    if not len(index):
      return
    su, sv = u[index], v[index]
    albedo[index] = _material_albedo(material, su + offset, sv, table)
    for decoration in decorations:
      inside = ((su >= decoration.u0) & (su <= decoration.u1) & (sv >= decoration.v0)
                & (sv <= decoration.v1))
      if inside.any():
        color, glow = _decoration_albedo(decoration, su[inside], sv[inside], table)
        albedo[index[inside]] = color
        glows[index[inside]] = glow

  paint(hits.surface == FLOOR, layout.floor, () if layout.rug is None else (layout.rug,))
  ceiling = hits.surface == CEILING
  albedo[ceiling] = layout.ceiling * (0.97 + 0.06 * _noise(table, u[ceiling], v[ceiling]))[:, None]
  for wall in range(4):
    selected = hits.surface == WALL_X0 + wall
    paint(selected, layout.walls[wall], layout.decorations[wall], offset=13.0 * wall)
    # A skirting board along the floor.
    skirting = selected & (v < 0.08)
    albedo[skirting] = albedo[skirting] * 0.3 + 0.6 * layout.ceiling
  for box, material in enumerate(layout.box_materials):
    paint(hits.surface == FIRST_BOX + box, material, offset=7.0 * box)
  return albedo, glows


def _light(layout: RoomLayout, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
  """RGB irradiance at points (N, 3) with normals (N, 3): ambient, lamp and fill light."""
  to_lamp = layout.lamp.astype(np.float32) - points
  distance_sq = np.einsum("nc,nc->n", to_lamp, to_lamp)
  cosine = np.maximum(np.einsum("nc,nc->n", normals, to_lamp), 0) / np.sqrt(distance_sq)
  lamp = cosine / (1 + distance_sq / layout.lamp_falloff_m**2)
  fill = np.maximum(normals @ layout.fill_direction, 0)
  return (layout.ambient + lamp[:, None] * layout.lamp_color.astype(np.float32)
          + fill[:, None] * layout.fill_color.astype(np.float32))


def _occlusion(layout: RoomLayout, hits: _Hits) -> np.ndarray:
  """Ambient-occlusion-like darkening in corners, along walls and under furniture."""
  x, y, z = hits.points[:, 0], hits.points[:, 1], hits.points[:, 2]
  width, length, height = layout.size.astype(np.float32)
  to_wall = np.minimum(np.minimum(x, width - x), np.minimum(y, length - y))
  floor = hits.surface == FLOOR
  walls = (hits.surface >= WALL_X0) & (hits.surface <= WALL_Y1)
  # On a wall `to_wall` is 0 along its own plane; the side walls set it near a corner.
  across = np.where(walls, np.where(hits.surface <= WALL_X1,
                                    np.minimum(y, length - y), np.minimum(x, width - x)), to_wall)
  factor = 1 - 0.25 * np.exp(-across / 0.25)
  factor = factor * np.where(floor | walls, 1 - 0.25 * np.exp(-np.minimum(z, height - z) / 0.2),
                             1.0)
  for lo, hi in zip(layout.box_lo, layout.box_hi, strict=True):
    dx = np.maximum(np.maximum(lo[0] - x, x - hi[0]), 0)
    dy = np.maximum(np.maximum(lo[1] - y, y - hi[1]), 0)
    strength = 0.45 if lo[2] == 0 and hi[0] - lo[0] > 0.1 else 0.0
    if lo[2] > 0.3:  # A table top shades the floor under it.
      strength = 0.35
    if strength:
      factor = factor * np.where(floor, 1 - strength * np.exp(-np.hypot(dx, dy) / 0.12), 1.0)
  return factor.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _RoomImage:
  # (3, C, C) float32 with `margin` extra pixels on each side. Per-example image work is done
  # channels-first: numpy broadcasts over a trailing axis of 3 many times slower.
  color: np.ndarray
  depth: np.ndarray  # (R, R) float32 z-depth in metres at the fg_bg frame's pixel centres.
  surface: np.ndarray  # (R, R) int16
  floor_cells: np.ndarray  # Flat indices of _PLACEMENT_GRID cells whose centre sees floor.
  margin: int
  exposure: float  # Scale the camera applied to irradiance x albedo.

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.color, self.depth, self.surface, self.floor_cells))


def _margin(resolution: int) -> int:
  return math.ceil(MAX_SHIFT_PX_AT_80 * resolution / 80) + 1


def _render_room(layout: RoomLayout, resolution: int) -> _RoomImage:
  margin = _margin(resolution)
  canvas = resolution + 2 * margin
  # Colour: 2 x 2 samples per pixel, so edges and distant textures are antialiased.
  samples = (np.arange(2 * canvas, dtype=np.float32) + 0.5) / 2 - margin
  directions = layout.camera.rays(samples[:, None], samples[None, :], resolution)
  hits = _cast(layout, directions.reshape(-1, 3))
  albedo, glows = _room_albedo(layout, hits)
  light = _light(layout, hits.points, hits.normals) * _occlusion(layout, hits)[:, None]
  color = np.where(glows[:, None], albedo * 1.6, albedo * light)
  color = color.reshape(canvas, 2, canvas, 2, 3).mean(axis=(1, 3))
  inner = color[margin:margin + resolution, margin:margin + resolution]
  exposure = layout.brightness / max(float(inner.mean()), 1e-3)
  color = np.minimum(color * exposure, 1.0).astype(np.float32).transpose(2, 0, 1).copy()
  # Geometry exactly at the pixel centres of the fg_bg frame.
  centres = np.arange(resolution, dtype=np.float32) + 0.5
  directions = layout.camera.rays(centres[:, None], centres[None, :], resolution)
  hits = _cast(layout, directions.reshape(-1, 3))
  surface = hits.surface.reshape(resolution, resolution)
  # Where an object's feet may go: floor, above the bottom row of cells.
  cells = (np.arange(_PLACEMENT_GRID - 1, dtype=np.float32) + 0.5) * (resolution / _PLACEMENT_GRID)
  cell_columns = (np.arange(_PLACEMENT_GRID, dtype=np.float32) + 0.5) * (
      resolution / _PLACEMENT_GRID)
  directions = layout.camera.rays(cells[:, None], cell_columns[None, :], resolution)
  floor_cells = np.flatnonzero(_cast(layout, directions.reshape(-1, 3)).surface == FLOOR)
  return _RoomImage(
      color=color,
      depth=hits.depth.reshape(resolution, resolution).astype(np.float32),
      surface=surface,
      floor_cells=floor_cells.astype(np.int32),
      margin=margin,
      exposure=exposure,
  )


class _RoomCache:
  """Least-recently-used rendered rooms, bounded in bytes; thread-safe."""

  def __init__(self, max_bytes: int):
    self._max_bytes = max_bytes
    self._entries: collections.OrderedDict[Any, _RoomImage] = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()

  def get(self, key, build) -> _RoomImage:
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


# --------------------------------------------------------------------------------------------
# Animal-like shapes: signed distances on the object's plane (u right, v up).

_HARMONICS = np.arange(2, 7, dtype=np.float32)  # Fourier harmonics that make outlines wobble.


class _ShapeBuilder:
  """Collects the parts of a shape in template units; `build` stacks them into arrays."""

  def __init__(self):
    self.ellipses: list[tuple] = []
    self.capsules: list[tuple] = []
    self.triangles: list[tuple] = []

  def ellipse(self, center, axes, angle=0.0, exponent=2.0, wobble=None):
    """A superellipse; `wobble` (amplitudes, phases) per harmonic perturbs its radius."""
    if wobble is None:
      wobble = (np.zeros(len(_HARMONICS)), np.zeros(len(_HARMONICS)))
    self.ellipses.append((center, axes, angle, exponent, *wobble))

  def capsule(self, start, end, start_radius, end_radius):
    """A segment thickened by a radius that tapers linearly from start to end."""
    self.capsules.append((start, end, start_radius, end_radius))

  def triangle(self, a, b, c, rounding=0.0):
    cross = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    self.triangles.append(((a, b, c) if cross > 0 else (a, c, b), rounding))

  def build(self, blend, head_center, head_radius, thickness) -> AnimalShape:
    def column(parts, index, width):
      return np.array([part[index] for part in parts], np.float32).reshape(len(parts), width)

    ellipses, capsules, triangles = self.ellipses, self.capsules, self.triangles
    harmonics = len(_HARMONICS)
    shape = AnimalShape(
        ellipse_center=column(ellipses, 0, 2),
        ellipse_axes=column(ellipses, 1, 2),
        ellipse_angle=column(ellipses, 2, 1)[:, 0],
        ellipse_exponent=column(ellipses, 3, 1)[:, 0],
        ellipse_amplitude=column(ellipses, 4, harmonics),
        ellipse_phase=column(ellipses, 5, harmonics),
        capsule_start=column(capsules, 0, 2),
        capsule_end=column(capsules, 1, 2),
        capsule_radius=np.concatenate([column(capsules, 2, 1), column(capsules, 3, 1)], 1),
        triangle_vertices=column(triangles, 0, 6).reshape(-1, 3, 2),
        triangle_rounding=column(triangles, 1, 1)[:, 0],
        blend=blend, head_center=head_center, head_radius=head_radius, thickness=thickness,
        scale=1.0, lift=0.0, unit_bounds=(0.0, 0.0, 0.0, 0.0))
    shape.unit_bounds = shape.outline_bounds()
    return shape


@dataclasses.dataclass
class AnimalShape:
  """A smooth union of superellipses, tapered capsules and triangles, facing +u.

  Parts are stored in template units; a point (u, v) in metres maps to ((u, v - lift) / scale),
  so `scaled_to` only changes two numbers. The union is a log-sum-exp smooth minimum, so joints
  blend like a body's and every part is evaluated in one vectorised pass.
  """

  ellipse_center: np.ndarray  # (E, 2)
  ellipse_axes: np.ndarray  # (E, 2)
  ellipse_angle: np.ndarray  # (E,)
  ellipse_exponent: np.ndarray  # (E,)
  ellipse_amplitude: np.ndarray  # (E, len(_HARMONICS))
  ellipse_phase: np.ndarray  # (E, len(_HARMONICS))
  capsule_start: np.ndarray  # (C, 2)
  capsule_end: np.ndarray  # (C, 2)
  capsule_radius: np.ndarray  # (C, 2) at start and end.
  triangle_vertices: np.ndarray  # (T, 3, 2) counter-clockwise.
  triangle_rounding: np.ndarray  # (T,)
  blend: float  # Smooth-union radius, template units.
  head_center: tuple[float, float]
  head_radius: float
  thickness: float  # Radius of the rounded depth profile, template units.
  scale: float  # Metres per template unit.
  lift: float  # Metres the template's origin sits above the floor.
  unit_bounds: tuple[float, float, float, float]  # (left, right, bottom, top), template units.

  def bounds(self) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in metres."""
    left, right, bottom, top = self.unit_bounds
    return (left * self.scale, right * self.scale, bottom * self.scale + self.lift,
            top * self.scale + self.lift)

  def scaled_to(self, height: float) -> AnimalShape:
    """The shape with its lowest point on v = 0 and its highest at `height` metres."""
    _, _, bottom, top = self.unit_bounds
    scaled = copy.copy(self)  # Shares the part arrays; `dataclasses.replace` is much slower.
    scaled.scale = height / (top - bottom)
    scaled.lift = -bottom * scaled.scale
    return scaled

  def to_metres(self, u: float, v: float) -> tuple[float, float]:
    return u * self.scale, v * self.scale + self.lift

  def outline_bounds(self) -> tuple[float, float, float, float]:
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False, dtype=np.float32)
    boundary = 1 + np.einsum("eh,eht->et", self.ellipse_amplitude,
                             np.cos(_HARMONICS[:, None] * theta + self.ellipse_phase[..., None]))
    cos, sin = np.cos(theta), np.sin(theta)
    power = 2 / self.ellipse_exponent[:, None]
    x = self.ellipse_axes[:, :1] * boundary * np.sign(cos) * np.abs(cos)**power
    y = self.ellipse_axes[:, 1:] * boundary * np.sign(sin) * np.abs(sin)**power
    ca, sa = np.cos(self.ellipse_angle)[:, None], np.sin(self.ellipse_angle)[:, None]
    points = [np.stack([self.ellipse_center[:, :1] + ca * x - sa * y,
                        self.ellipse_center[:, 1:] + sa * x + ca * y], -1).reshape(-1, 2)]
    for end, radius in ((self.capsule_start, self.capsule_radius[:, :1]),
                        (self.capsule_end, self.capsule_radius[:, 1:])):
      points += [end - radius, end + radius]
    points.append(self.triangle_vertices.reshape(-1, 2))
    points = np.concatenate(points)
    pad = self.blend
    return (float(points[:, 0].min() - pad), float(points[:, 0].max() + pad),
            float(points[:, 1].min()), float(points[:, 1].max() + pad))

  def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance in metres (negative inside) at points (u, v) in metres."""
    shape = np.shape(u)
    x = (np.ravel(u) / self.scale).astype(np.float32)
    y = ((np.ravel(v) - self.lift) / self.scale).astype(np.float32)
    distances = np.concatenate(
        [self._ellipses(x, y), self._capsules(x, y), self._triangles(x, y)])
    nearest = distances.min(axis=0)
    softness = np.float32(self.blend * 0.3)
    blended = nearest - softness * np.log(np.exp((nearest - distances) / softness).sum(axis=0))
    return (blended * self.scale).reshape(shape)

  def _ellipses(self, x, y):
    du = x - self.ellipse_center[:, :1]
    dv = y - self.ellipse_center[:, 1:]
    cos, sin = np.cos(self.ellipse_angle)[:, None], np.sin(self.ellipse_angle)[:, None]
    a, b = self.ellipse_axes[:, :1], self.ellipse_axes[:, 1:]
    px, py = (cos * du + sin * dv) / a, (cos * dv - sin * du) / b
    ax, ay = np.abs(px), np.abs(py)
    p = self.ellipse_exponent[:, None]
    # Superellipse "radius" |x|^p + |y|^p)^(1/p) and its gradient, for a first-order distance.
    ax1, ay1 = ax**(p - 1), ay**(p - 1)
    radius = np.maximum((ax1 * ax + ay1 * ay)**(1 / p), 1e-4)
    gradient = radius**(1 - p) * np.sqrt((ax1 / a)**2 + (ay1 / b)**2)
    theta = np.arctan2(py, px)
    wobble = np.einsum("eh,ehn->en", self.ellipse_amplitude,
                       np.cos(_HARMONICS[:, None] * theta[:, None, :]
                              + self.ellipse_phase[..., None]))
    return (radius - 1 - wobble) / np.maximum(gradient, 1e-3)

  def _capsules(self, x, y):
    start, end = self.capsule_start, self.capsule_end
    bu, bv = (end - start)[:, :1], (end - start)[:, 1:]
    pu, pv = x - start[:, :1], y - start[:, 1:]
    h = np.clip((pu * bu + pv * bv) / np.maximum(bu * bu + bv * bv, 1e-12), 0, 1)
    start_radius, end_radius = self.capsule_radius[:, :1], self.capsule_radius[:, 1:]
    radius = start_radius + (end_radius - start_radius) * h
    du, dv = pu - bu * h, pv - bv * h
    return np.sqrt(du * du + dv * dv) - radius

  def _triangles(self, x, y):
    a = self.triangle_vertices
    b = np.roll(a, -1, axis=1)
    edge = b - a  # (T, 3, 2)
    length = np.hypot(edge[..., 0], edge[..., 1])[..., None]
    # Distance to each edge's line, positive outside a counter-clockwise triangle.
    side = ((x - a[..., :1]) * edge[..., 1:] - (y - a[..., 1:]) * edge[..., :1]) / length
    return side.max(axis=1) - self.triangle_rounding[:, None]


def _wobble(rng: np.random.Generator, amplitude: float, harmonics: int = 5):
  count = len(_HARMONICS)
  amplitudes = rng.uniform(0, amplitude, count) / np.sqrt(_HARMONICS)
  amplitudes[harmonics - 1:] = 0.0
  return amplitudes, rng.uniform(0, 2 * np.pi, count)


def _ears(rng: np.random.Generator, shape: _ShapeBuilder, center, radius):
  cx, cy = center
  if rng.random() < 0.65:  # Pointed, upright.
    height = radius * rng.uniform(0.5, 1.1)
    lean = radius * rng.uniform(-0.25, 0.15)
    for offset in (-0.45, 0.2):
      base_u = cx + offset * radius
      shape.triangle((base_u - 0.3 * radius, cy + 0.55 * radius),
                     (base_u + 0.3 * radius, cy + 0.7 * radius),
                     (base_u + lean, cy + 0.75 * radius + height), 0.04 * radius)
  else:  # Floppy, hanging beside the head.
    length = radius * rng.uniform(0.6, 1.1)
    shape.ellipse((cx - 0.35 * radius, cy + 0.1 * radius), (0.28 * radius, length / 2 + 0.1),
                  angle=rng.uniform(-0.6, -0.2))


def _tail(rng: np.random.Generator, shape: _ShapeBuilder, start, radius, segments: int = 3,
          heading: float | None = None):
  heading = rng.uniform(0.55, 0.95) * math.pi if heading is None else heading
  bend = rng.uniform(-0.5, 0.5)
  length = rng.uniform(0.2, 0.4)
  point = start
  for k in range(segments):
    heading += bend
    end = (point[0] + length * math.cos(heading),
           max(point[1] + length * math.sin(heading), radius))
    shape.capsule(point, end, radius * (1 - 0.25 * k / segments),
                  radius * (1 - 0.25 * (k + 1) / segments))
    point = end


def _quadruped(rng: np.random.Generator) -> AnimalShape:
  shape = _ShapeBuilder()
  leg = rng.uniform(0.45, 0.95)
  body_length = rng.uniform(1.6, 2.8)
  body = (0.0, leg + 0.45)
  shape.ellipse(body, (body_length / 2, 0.5), rng.uniform(-0.08, 0.08), rng.uniform(2.0, 3.0),
                _wobble(rng, 0.06))
  head_radius = rng.uniform(0.35, 0.55)
  head = (body_length / 2 + head_radius * rng.uniform(0.0, 0.5),
          body[1] + 0.5 + head_radius * rng.uniform(0.2, 0.9))
  shape.ellipse(head, (head_radius * rng.uniform(1.0, 1.25), head_radius), rng.uniform(-0.2, 0.2),
                2.0, _wobble(rng, 0.04, 3))
  shape.capsule((body_length / 2 - 0.3, body[1] + 0.1), head, 0.32, head_radius * 0.7)
  if rng.random() < 0.5:  # A snout.
    snout = (head_radius * rng.uniform(0.4, 0.8), head_radius * rng.uniform(0.3, 0.45))
    shape.ellipse((head[0] + head_radius * 0.9, head[1] - head_radius * 0.25), snout)
  _ears(rng, shape, head, head_radius)
  leg_radius = rng.uniform(0.12, 0.2)
  for side in (1.0, -1.0):
    x = side * (body_length / 2 - 0.35)
    for offset in (-0.12, 0.12):
      foot = (x + offset + rng.uniform(-0.15, 0.15), leg_radius * 0.8)
      shape.capsule((x + offset, body[1]), foot, leg_radius, leg_radius * rng.uniform(0.6, 0.9))
  _tail(rng, shape, (-body_length / 2 + 0.1, body[1] + 0.2), rng.uniform(0.06, 0.2))
  return shape.build(rng.uniform(0.06, 0.15), head, head_radius, 0.35)


def _sitting(rng: np.random.Generator) -> AnimalShape:
  shape = _ShapeBuilder()
  body_width = rng.uniform(0.32, 0.45)
  shape.ellipse((0.0, 0.55), (body_width, 0.55), rng.uniform(-0.15, 0.05), rng.uniform(2.0, 2.6),
                _wobble(rng, 0.06))
  shape.ellipse((-0.1, 0.25), (body_width + 0.1, 0.25), 0.0, 2.5)  # Haunches.
  head_radius = rng.uniform(0.26, 0.36)
  head = (rng.uniform(0.05, 0.2), 1.05 + head_radius * 0.6)
  shape.ellipse(head, (head_radius * rng.uniform(1.0, 1.2), head_radius), rng.uniform(-0.15, 0.15),
                2.0, _wobble(rng, 0.04, 3))
  _ears(rng, shape, head, head_radius)
  paw = rng.uniform(0.06, 0.1)
  for offset in (0.0, 0.1):
    shape.capsule((body_width * 0.5 + offset, 0.55), (body_width * 0.6 + offset, paw), paw * 1.1,
                  paw)
  _tail(rng, shape, (-body_width * 0.8, 0.1), rng.uniform(0.05, 0.12), 3,
        heading=float(rng.choice([math.pi, 0.75 * math.pi])))
  return shape.build(rng.uniform(0.04, 0.1), head, head_radius, 0.3)


def _bird(rng: np.random.Generator) -> AnimalShape:
  shape = _ShapeBuilder()
  legs = rng.uniform(0.25, 0.5) if rng.random() < 0.6 else 0.0
  body = (0.0, legs + 0.45)
  body_length = rng.uniform(0.45, 0.75)
  shape.ellipse(body, (body_length, 0.45), rng.uniform(-0.4, 0.1), 2.0, _wobble(rng, 0.15, 6))
  head_radius = rng.uniform(0.2, 0.3)
  head = (body_length * rng.uniform(0.4, 0.7), legs + 0.9 + rng.uniform(0.0, 0.25))
  shape.ellipse(head, (head_radius, head_radius), 0.0, 2.0, _wobble(rng, 0.05, 3))
  beak = rng.uniform(0.15, 0.35)
  shape.triangle((head[0] + head_radius * 0.7, head[1] + head_radius * 0.25),
                 (head[0] + head_radius * 0.7, head[1] - head_radius * 0.25),
                 (head[0] + head_radius * 0.7 + beak, head[1] - head_radius * 0.1))
  shape.triangle((-body_length * 0.7, body[1] + 0.15), (-body_length * 0.7, body[1] - 0.15),
                 (-body_length - rng.uniform(0.2, 0.45), body[1] + rng.uniform(-0.1, 0.3)), 0.02)
  if legs:
    for offset in (-0.08, 0.1):
      shape.capsule((offset, body[1]), (offset + 0.05, 0.03), 0.04, 0.03)
      shape.ellipse((offset + 0.1, 0.03), (0.1, 0.03))
  else:  # Sitting on the floor: a flat base so the wobbly body does not hover.
    shape.ellipse((0.0, 0.05), (body_length * 0.6, 0.05))
  return shape.build(rng.uniform(0.03, 0.08), head, head_radius, 0.35)

_TEMPLATES = ((_quadruped, (0.6, 1.5)), (_sitting, (0.55, 1.3)), (_bird, (0.5, 1.2)))


# --------------------------------------------------------------------------------------------
# Object style.


_FUR = np.array([
    (0.08, 0.07, 0.07), (0.90, 0.88, 0.84), (0.50, 0.50, 0.50), (0.45, 0.30, 0.18),
    (0.85, 0.50, 0.20), (0.90, 0.80, 0.60), (0.70, 0.55, 0.35), (0.25, 0.17, 0.10),
    (0.60, 0.55, 0.50), (0.35, 0.33, 0.32),
], np.float32)
_PATTERNS = ("plain", "tabby", "patches", "spots")


@dataclasses.dataclass(frozen=True)
class _Style:
  colors: np.ndarray  # (2, 3): main colour and pattern colour.
  pattern: str
  fur: float  # Contrast of the fine fur noise.
  period: float  # Pattern size relative to the object's height.
  stripe_angle: float
  eye: np.ndarray  # (3,)


def _sample_style(rng: np.random.Generator, background: np.ndarray | None) -> _Style:
  """A coat; `background` (3,) asks for a colour close to what lies behind the object."""
  if background is not None:
    # Close to the background, yet a little lighter or darker so that a person can find it.
    tone = 1 + rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.3)
    main = np.clip(background * tone * rng.uniform(0.93, 1.07, 3), 0.02, 1).astype(np.float32)
    second = np.clip(main * rng.uniform(0.8, 1.2), 0.02, 1).astype(np.float32)
    pattern = _PATTERNS[2 * rng.integers(2)]  # Plain or patches.
    fur = rng.uniform(0.05, 0.15)
  else:
    if rng.random() < 0.15:  # A toy or a dyed animal: any colour.
      main = rng.uniform(0.05, 0.95, 3).astype(np.float32)
    else:
      main = _pick(rng, _FUR, 0.15)
    second = _pick(rng, _FUR, 0.15)
    pattern = _PATTERNS[rng.integers(len(_PATTERNS))]
    fur = rng.uniform(0.1, 0.35)
  return _Style(np.stack([main, second]), pattern, fur, rng.uniform(0.06, 0.15),
                rng.uniform(-0.5, 0.5), _jitter(rng, np.full(3, 0.06, np.float32), 0.5))


def _object_albedo(style: _Style, shape: AnimalShape, u: np.ndarray, v: np.ndarray,
                   table: np.ndarray) -> np.ndarray:
  height = shape.bounds()[3]
  s, t = u / height, v / height
  main, second = style.colors
  fur = (_noise(table, s * 40, t * 40) - 0.5) * 0.6 + (_noise(table, s * 12, t * 12) - 0.5) * 0.4
  if style.pattern == "tabby":
    wave = np.sin((s * math.cos(style.stripe_angle) + t * math.sin(style.stripe_angle))
                  * (2 * math.pi / style.period) + 3 * _noise(table, s * 6, t * 6))
    weight = np.clip(wave * 2, 0, 1)
  elif style.pattern == "patches":
    weight = np.clip((_fractal(table, s * 3 + 9, t * 3, 2) - 0.5) * 8 + 0.5, 0, 1)
  elif style.pattern == "spots":
    weight = np.clip((_noise(table, s / style.period, t / style.period + 5) - 0.7) * 10, 0, 1)
  else:
    weight = None
  main, second = main[:, None, None], second[:, None, None]
  albedo = main if weight is None else main + (second - main) * weight
  albedo = albedo * (1 + style.fur * fur)
  eye_u, eye_v = shape.to_metres(shape.head_center[0] + 0.4 * shape.head_radius,
                                 shape.head_center[1] + 0.15 * shape.head_radius)
  radius = shape.head_radius * shape.scale
  eye = np.clip((0.14 * radius - np.hypot(u - eye_u, v - eye_v)) / (0.04 * radius), 0, 1)
  return albedo + (style.eye[:, None, None] - albedo) * eye


# --------------------------------------------------------------------------------------------
# Compositing one example.


@dataclasses.dataclass(frozen=True)
class _Placement:
  shape: AnimalShape  # Scaled to its height in metres.
  contact: np.ndarray  # (3,) on the floor.
  normal: np.ndarray  # (3,) horizontal unit vector from the camera towards the object.
  across: np.ndarray  # (3,) horizontal unit vector to the camera's right on the object's plane.
  facing: float  # +1: the head points to the right of the image; -1: to the left.
  box: tuple[int, int, int, int]  # Pixel rows [r0, r1) and columns [c0, c1) to draw in.


def _place_object(layout: RoomLayout, room_image: _RoomImage, resolution: int,
                  rng: np.random.Generator, unit_shape: AnimalShape, height_range,
                  attempt: int, closeup: bool) -> _Placement | None:
  """A random stance on a visible floor point (or, for a close-up, on the floor between the
  camera and the bottom of the frame), or None where it does not fit."""
  camera = layout.camera
  floor = room_image.floor_cells
  if not len(floor):
    return None
  # The nearer of two floor cells: more objects near the camera, as in photos taken of a pet
  # rather than of a room.
  row, col = divmod(int(floor[rng.integers(len(floor), size=2)].max()), _PLACEMENT_GRID)
  cell = resolution / _PLACEMENT_GRID
  direction = camera.rays((row + rng.random()) * cell, (col + rng.random()) * cell,
                          resolution).astype(np.float64)
  # Fewer big objects fit, so later attempts shrink the height range.
  shrink = 0.85**max(0, attempt - 10)
  height = math.exp(rng.uniform(math.log(height_range[0]), math.log(height_range[1]))) * shrink
  facing = 1.0 if rng.random() < 0.5 else -1.0
  lower = rng.uniform(0.6, 0.95)
  nearer = rng.uniform(0.4, 1.0)
  height *= rng.uniform(*_CLOSEUP_HEIGHT_GAIN) if closeup else 1.0
  if closeup:  # Below the visible floor: the ray through the bottom edge, part of the way.
    direction = camera.rays(resolution, (col + rng.random()) * cell, resolution).astype(
        np.float64)
  if direction[2] >= 0:
    return None
  contact = camera.position - (camera.position[2] / direction[2]) * direction
  if closeup:
    contact[:2] = camera.position[:2] + nearer * (contact[:2] - camera.position[:2])
  contact[2] = 0.0
  # An object too tall for the frame above its feet is made shorter rather than moved, so near
  # the camera sizes are drawn among those that fit.
  start = contact - camera.position
  edge = resolution * _EDGE
  top_row = 2 * edge - resolution / 2  # Relative to the centre of the image.
  slope = top_row / focal_length_px(resolution)
  along, rise = start @ camera.forward, start @ camera.down
  ceiling = (slope * along - rise) / (camera.down[2] - slope * camera.forward[2])
  if ceiling <= 0.05:
    return None
  if height > ceiling:
    height = ceiling * lower
  normal = contact - camera.position
  normal[2] = 0.0
  distance = math.hypot(normal[0], normal[1])
  if distance < 0.6:
    return None
  normal /= distance
  across = np.array([normal[1], -normal[0], 0.0])
  contact_row, contact_col = camera.project(contact, resolution)
  if contact_row > resolution - 2 * edge and not closeup:
    return None
  for _ in range(2):
    shape = unit_shape.scaled_to(height)
    left, right, _, top = shape.bounds()
    if facing < 0:
      left, right = -right, -left
    ends = contact + np.outer([left, right], across)
    corners = np.concatenate([ends, ends + (0.0, 0.0, top)])
    rows, cols = camera.project(corners, resolution)
    if closeup and rows.min() >= edge:  # The frame may cut its feet and sides, not its head.
      break
    if rows.min() >= edge and cols.min() >= edge and rows.max() <= resolution - edge and (
        cols.max() <= resolution - edge):
      break
    # Too wide for where it stands: shrink it about its feet (image offsets from the contact
    # point scale nearly linearly with its size) and check again.
    room_left, room_right = contact_col - edge, resolution - edge - contact_col
    need_left, need_right = contact_col - cols.min(), cols.max() - contact_col
    fit = min(room_left / max(need_left, 1e-6), room_right / max(need_right, 1e-6),
              (contact_row - edge) / max(contact_row - rows.min(), 1e-6))
    if closeup:
      fit = (contact_row - edge) / max(contact_row - rows.min(), 1e-6)
    elif fit < 0.4 or rows.max() > resolution - edge:
      return None
    height *= 0.97 * fit
  else:
    return None
  # The object and its rounded thickness stay inside the room and out of the furniture.
  thickness = shape.thickness * shape.scale
  lo = ends.min(axis=0) - thickness
  hi = ends.max(axis=0) + thickness
  if (lo[:2] < 0.05).any() or (hi[:2] > layout.size[:2] - 0.05).any():
    return None
  lo[2], hi[2] = 0.0, top
  if len(layout.box_lo) and ((lo < layout.box_hi) & (layout.box_lo < hi)).all(axis=1).any():
    return None
  box = (max(int(rows.min()) - 2, 0), min(math.ceil(rows.max()) + 2, resolution),
         max(int(cols.min()) - 2, 0), min(math.ceil(cols.max()) + 2, resolution))
  return _Placement(shape, contact, normal, across, facing, box)


@dataclasses.dataclass(frozen=True)
class _Drawn:
  """The object on its placement's pixel box."""

  alpha: np.ndarray  # Coverage, zero where the room hides the object.
  unoccluded_alpha: np.ndarray
  depth: np.ndarray  # z-depth of the object's surface.
  u: np.ndarray  # Object coordinates in metres, u towards the head.
  v: np.ndarray
  roundness: np.ndarray  # 0 at the outline, 1 a depth-profile radius inside it.


def _draw_object(layout: RoomLayout, room_image: _RoomImage, placement: _Placement,
                 resolution: int, softness: float) -> _Drawn:
  camera = layout.camera
  r0, r1, c0, c1 = placement.box
  rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
  cols = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
  directions = camera.rays(rows, cols, resolution)
  normal = placement.normal.astype(np.float32)
  plane_depth = np.float32((placement.contact - camera.position) @ placement.normal) / (
      directions @ normal)
  # Room points on the object's plane, relative to the contact point.
  start = (camera.position - placement.contact).astype(np.float32)
  u = (start @ placement.across.astype(np.float32)
       + plane_depth * (directions @ placement.across.astype(np.float32))) * placement.facing
  v = np.float32(camera.position[2]) + plane_depth * directions[..., 2]
  shape = placement.shape
  distance = shape.sdf(u, v)
  footprint = plane_depth * np.float32(softness / focal_length_px(resolution))
  alpha = np.clip(0.5 - distance / footprint, 0, 1)
  # A round depth profile: a circular arc of radius `thickness` across the silhouette.
  thickness = np.float32(shape.thickness * shape.scale)
  inside = np.clip(distance / -thickness, 0, 1)
  roundness = np.sqrt(inside * (2 - inside))
  depth = plane_depth - thickness * roundness
  visible = depth < room_image.depth[r0:r1, c0:c1]
  return _Drawn(alpha * visible, alpha, depth, u, v, roundness)


def _draw_shadow(layout: RoomLayout, room_image: _RoomImage, placement: _Placement,
                 resolution: int, rng: np.random.Generator) -> np.ndarray:
  """How much of the light the object takes from the floor around it, (R, R) in [0, 1]."""
  camera = layout.camera
  shape = placement.shape
  left, right, _, top = shape.bounds()
  contact = placement.contact
  lamp = layout.lamp
  cast_strength = rng.uniform(0.2, 0.5)
  contact_strength = rng.uniform(0.25, 0.55)
  blur = rng.uniform(0.1, 0.3)
  contact_radius = (0.45 * (right - left), rng.uniform(0.12, 0.25))
  # The lamp's shadow is cast by the same silhouette turned to face the lamp: a stand-in for the
  # volume of a real animal, which looks much the same from the camera and from the lamp.
  towards = contact - lamp
  towards[2] = 0.0
  reach = math.hypot(towards[0], towards[1])
  normal = towards / reach if reach > 1e-3 else placement.normal
  across = np.array([normal[1], -normal[0], 0.0])
  flip = placement.facing * (1.0 if across @ placement.across >= 0 else -1.0)
  # The floor points under the top of the silhouette, seen from the lamp, bound the shadow.
  extent = max(abs(left), abs(right))
  top_corners = contact + np.outer([-extent, extent], across) + (0.0, 0.0, top)
  landing = lamp + (top_corners - lamp) * (lamp[2] / (lamp[2] - top))
  spread = max(contact_radius)
  base = contact + np.array([[-spread, -spread, 0], [spread, spread, 0], [-spread, spread, 0],
                             [spread, -spread, 0]])
  floor_points = np.concatenate([landing, base])
  floor_points[:, 2] = 0.0
  floor_points = floor_points[(floor_points - camera.position) @ camera.forward > 0.1]
  shadow = np.zeros((resolution, resolution), np.float32)
  if not len(floor_points):
    return shadow
  rows, cols = camera.project(floor_points, resolution)
  r0, r1 = max(int(rows.min()) - 2, 0), min(math.ceil(rows.max()) + 3, resolution)
  c0, c1 = max(int(cols.min()) - 2, 0), min(math.ceil(cols.max()) + 3, resolution)
  if r0 >= r1 or c0 >= c1:
    return shadow
  floor = room_image.surface[r0:r1, c0:c1] == FLOOR
  directions = camera.rays(np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5,
                           np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5, resolution)[floor]
  points = camera.position.astype(np.float32) + (
      np.float32(camera.position[2]) / np.maximum(-directions[:, 2], 1e-6))[:, None] * directions
  offset = points - contact.astype(np.float32)
  # Cast shadow: follow each floor point towards the lamp up to the silhouette's plane.
  to_lamp = lamp.astype(np.float32) - points
  normal = normal.astype(np.float32)
  denominator = to_lamp @ normal
  denominator = np.where(np.abs(denominator) < 1e-6, np.float32(1e-6), denominator)
  step = -(offset @ normal) / denominator
  crossing = offset + step[:, None] * to_lamp
  u = (crossing @ across.astype(np.float32)) * np.float32(flip)
  v = crossing[:, 2]
  penumbra = np.float32(0.01) + np.float32(blur) * np.maximum(v, 0)
  # Only points whose path to the lamp crosses the silhouette's bounding box can be shaded.
  reach = penumbra + np.float32(shape.blend * shape.scale)
  candidates = np.flatnonzero((step > 0) & (step < 1) & (u > left - reach) & (u < right + reach)
                              & (v < top + reach))
  cast = np.zeros_like(v)
  cast[candidates] = np.clip(
      0.5 - shape.sdf(u[candidates], v[candidates]) / penumbra[candidates], 0, 1)
  # Contact shadow: a soft ellipse on the floor under the object.
  a = (offset @ placement.across.astype(np.float32)) / np.float32(contact_radius[0])
  b = (offset @ placement.normal.astype(np.float32)) / np.float32(contact_radius[1])
  contact_shadow = np.exp(-(a * a + b * b))
  darkening = 1 - (1 - cast_strength * cast) * (1 - contact_strength * contact_shadow)
  region = shadow[r0:r1, c0:c1]
  region[floor] = darkening
  return shadow


def _shift(canvas: np.ndarray, margin: int, resolution: int, dy: float, dx: float) -> np.ndarray:
  """The (3, C, C) canvas sampled at the frame offset by (dy, dx) pixels, bilinearly."""
  y0, x0 = math.floor(dy), math.floor(dx)
  fy, fx = np.float32(dy - y0), np.float32(dx - x0)
  ry, rx = margin + y0, margin + x0
  window = canvas[:, ry:ry + resolution + 1, rx:rx + resolution + 1]
  columns = window[:, :, :-1] + (window[:, :, 1:] - window[:, :, :-1]) * fx
  return columns[:, :-1] + (columns[:, 1:] - columns[:, :-1]) * fy


def _blur(image: np.ndarray) -> np.ndarray:
  """A [1, 2, 1] / 4 blur of a (3, R, R) image in both directions."""
  padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="edge")
  rows = (padded[:, :-2] + padded[:, 2:]) * np.float32(0.25) + padded[:, 1:-1] * np.float32(0.5)
  return ((rows[:, :, :-2] + rows[:, :, 2:]) * np.float32(0.25)
          + rows[:, :, 1:-1] * np.float32(0.5))


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """A JPEG encode and decode of an RGB uint8 image (default 4:2:0 chroma subsampling)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  # Decoding straight from the bytes skips `Image.open`'s header parsing in Python, which costs
  # more than the decoding itself at 80 px.
  height, width = image.shape[:2]
  decoded = Image.frombytes("RGB", (width, height), buffer.getvalue(), "jpeg", "RGB", "")
  return np.asarray(decoded)


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
  # Sensor noise is read from one fixed bank at a random offset: drawing fresh Gaussian samples
  # costs as much as the rest of an 80 px example. A constant seed keeps examples deterministic.
  return np.random.default_rng(0x5EED).standard_normal(1 << 21, dtype=np.float32)


@functools.lru_cache(maxsize=16)
def _radius_squared(resolution: int) -> np.ndarray:
  """Squared distance from the image centre, 1 at the corners."""
  centres = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
  return (centres[:, None]**2 + centres[None, :]**2) * 2


def _photograph(radiance: np.ndarray, rng: np.random.Generator, gain: np.ndarray,
                field: np.ndarray, realism: Realism) -> np.ndarray:
  """What a camera makes of radiance (3, R, R): exposure and white balance, maybe a slight
  blur, sensor noise, 8 bits and JPEG; uint8 (R, R, 3)."""
  image = radiance * (field * (gain * 255).astype(np.float32)[:, None, None])  # 8-bit units.
  if rng.random() < realism.blur_probability:
    image = _blur(image)
  bank = _noise_bank()
  start = rng.integers(max(len(bank) - image.size, 1))
  sigma = rng.uniform(*realism.noise_levels)
  if image.size <= len(bank):
    noise = bank[start:start + image.size]
  else:  # Beyond about 830 px the bank repeats; its period is far too long to show.
    noise = np.take(bank, np.arange(start, start + image.size), mode="wrap")
  image += noise.reshape(image.shape) * np.float32(sigma)
  image += np.float32(0.5)  # Rounds on the conversion below.
  pixels = np.clip(image, 0, 255, out=image).astype(np.uint8).transpose(1, 2, 0)
  low, high = realism.jpeg_quality
  return _jpeg(np.ascontiguousarray(pixels), int(rng.integers(low, high + 1)))


def _render_composite(layout: RoomLayout, room_image: _RoomImage, room: int, resolution: int,
                      rng: np.random.Generator, realism: Realism) -> SyntheticScene:
  margin = room_image.margin
  template, height_range = _TEMPLATES[rng.integers(len(_TEMPLATES))]
  unit_shape = template(rng)
  closeup = rng.random() < CLOSEUP_PROBABILITY
  softness = rng.uniform(1.0, 2.2)  # Width of the alpha ramp in pixels.
  placement = drawn = None
  for attempt in range(40):
    # A close-up that finds no room for ten tries becomes an ordinary shot.
    candidate = _place_object(layout, room_image, resolution, rng, unit_shape, height_range,
                              attempt, closeup and attempt < 10)
    if candidate is None:
      continue
    candidate_drawn = _draw_object(layout, room_image, candidate, resolution, softness)
    # Mostly hidden objects make useless examples: look for one at least 60 % visible.
    visible = candidate_drawn.alpha.sum()
    good = visible > 1 and visible >= 0.6 * candidate_drawn.unoccluded_alpha.sum()
    if good or placement is None:
      placement, drawn = candidate, candidate_drawn
    if good:
      break
  colour = room_image.color[:, margin:margin + resolution, margin:margin + resolution].copy()
  depth_m = room_image.depth.copy()
  mask = np.zeros((resolution, resolution), np.uint8)
  shadow = np.zeros((resolution, resolution), np.float32)
  contact, height = np.full(3, np.nan), 0.0
  if placement is not None:
    shape = placement.shape
    contact, height = placement.contact, shape.bounds()[3]
    shadow = _draw_shadow(layout, room_image, placement, resolution, rng)
    shadow *= np.float32(realism.shadow_strength)
    colour *= 1 - shadow
    r0, r1, c0, c1 = placement.box
    region = colour[:, r0:r1, c0:c1]
    camouflage = rng.random() < realism.camouflage_probability
    behind = region[:, drawn.alpha > 0.5]
    style = _sample_style(rng, behind.mean(axis=1) if camouflage and behind.size else None)
    table = rng.random((_NOISE_SIZE, _NOISE_SIZE), dtype=np.float32)
    albedo = _object_albedo(style, shape, drawn.u, drawn.v, table)
    if camouflage:  # Keep the borrowed colour as the camera sees it.
      light = np.ones((3, 1, 1), np.float32)
      shading = 0.8 + 0.2 * drawn.roundness
    else:
      # Lit by the lamp at the object's middle; rounder parts face the light, the top more so.
      centre = contact + (0.0, 0.0, height / 2)
      facing_camera = -placement.normal + (0.0, 0.0, 0.5)
      facing_camera /= np.linalg.norm(facing_camera)
      light = _light(layout, centre[None].astype(np.float32),
                     facing_camera[None].astype(np.float32)).reshape(3, 1, 1)
      light *= np.float32(room_image.exposure)
      shading = (0.55 + 0.45 * drawn.roundness) * (0.85 + 0.3 * drawn.v / np.float32(height))
    radiance = np.minimum(albedo * light * shading, 1.0)
    region += (radiance - region) * drawn.alpha
    mask[r0:r1, c0:c1] = np.round(drawn.alpha * 255).astype(np.uint8)
    front = mask[r0:r1, c0:c1] >= 128
    depth_m[r0:r1, c0:c1][front] = drawn.depth[front]

  # Two shots of the scene: a shared exposure, then independent mismatches.
  exposure = rng.uniform(0.85, 1.15)
  vignette = 1 - np.float32(layout.vignetting) * _radius_squared(resolution)
  balance = realism.white_balance_mismatch
  bg_gain = exposure * np.exp(balance * rng.standard_normal(3))
  fg_gain = (exposure * (1 + realism.exposure_mismatch * rng.uniform(-1, 1))
             * np.exp(balance * rng.standard_normal(3)))
  ramp = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
  tilt = (realism.lighting_tilt * rng.uniform(-1, 1, 2)).astype(np.float32)
  fg_field = vignette * (1 + tilt[0] * ramp[:, None] + tilt[1] * ramp[None, :])
  # A camera on a tripod: a fraction of a pixel between shots, unless it was nudged.
  nudged = rng.random() < realism.nudge_probability
  shift = (rng.uniform(min(1.0, realism.max_shift_px_at_80), realism.max_shift_px_at_80)
           if nudged else realism.jitter_px_at_80 * rng.random()) * resolution / 80
  shift_angle = rng.uniform(0, 2 * math.pi)
  dy, dx = shift * math.sin(shift_angle), shift * math.cos(shift_angle)
  bg = _photograph(_shift(room_image.color, margin, resolution, dy, dx), rng, bg_gain, vignette,
                   realism)
  fg_bg = _photograph(colour, rng, fg_gain, fg_field, realism)

  depth = np.clip(depth_m * np.float32(1 / schema.SYNTHETIC_MAX_DEPTH_M), 0, 1)
  return SyntheticScene(
      bg=bg,
      fg_bg=fg_bg,
      mask=mask[..., None],
      depth=np.round(depth * schema.DEPTH_MAX_CODE).astype(np.uint16)[..., None],
      room_seed=room,
      room_depth_m=room_image.depth,
      surface=room_image.surface,
      shadow=shadow,
      contact_point_m=contact,
      object_height_m=float(height),
      bg_shift_px=(float(dy), float(dx)),
  )
