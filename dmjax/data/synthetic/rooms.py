"""Camera and room layout: everything a room seed fixes, drawn by `room_layout`.

A room is an axis-aligned box (floor, four walls, ceiling) holding furniture-like boxes,
with windows, doors, pictures and rugs, a ceiling lamp and a fill light. Its seed also fixes
the camera: one pinhole model (`Camera`, FIELD_OF_VIEW_DEG on both axes) for every image.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from dmjax.data.synthetic.textures import (
  NOISE_SIZE,
  Decoration,
  Material,
  jitter,
  pick,
)

FIELD_OF_VIEW_DEG = 60.0
CAMERA_HEIGHT_RANGE_M = (1.0, 1.8)
MAX_SHIFT_PX_AT_80 = 3.0

# Surface codes of the ray caster; box k of a room is surface FIRST_BOX + k.
FLOOR, CEILING = 0, 1
WALL_X0, WALL_X1, WALL_Y0, WALL_Y1 = 2, 3, 4, 5
FIRST_BOX = 6
_ROOM_STREAM = 1


def focal_length_px(resolution: int) -> float:
  return resolution / 2 / math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2)


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
  noise: np.ndarray  # (NOISE_SIZE, NOISE_SIZE) float32 lattice for the textures.


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


def _sample_floor(rng: np.random.Generator) -> Material:
  kind = rng.choice(["wood", "wood", "tiles", "carpet"])
  if kind == "wood":
    return Material("wood", pick(rng, _WOODS)[None], rng.uniform(0.09, 0.22),
                    rng.uniform(0.1, 0.3))
  if kind == "tiles":
    first = pick(rng, _TILES)
    second = pick(rng, _TILES) if rng.random() < 0.3 else jitter(rng, first, 0.05)
    grout = jitter(rng, np.full(3, rng.choice([0.35, 0.8]), np.float32), 0.05)
    return Material("tiles", np.stack([first, second, grout]), rng.uniform(0.25, 0.6),
                    rng.uniform(0.03, 0.1))
  return Material("carpet", pick(rng, _FABRICS, 0.2)[None], 0.05, rng.uniform(0.08, 0.2))


def _sample_wall(rng: np.random.Generator, paint: np.ndarray) -> Material:
  if rng.random() < 0.2:
    other = jitter(rng, paint, 0.15) if rng.random() < 0.6 else pick(rng, _WALL_PAINTS)
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
      sky = jitter(rng, np.array([0.75, 0.85, 1.0], np.float32), 0.1)
      frame = jitter(rng, np.full(3, 0.92, np.float32), 0.05)
      colors = np.stack([sky, frame])
    elif kind == "door":
      width, v0, v1 = rng.uniform(0.75, 0.95), 0.0, min(rng.uniform(2.0, 2.15), room_height - 0.1)
      colors = np.stack([pick(rng, _WOODS) if rng.random() < 0.6 else pick(rng, _WALL_PAINTS),
                         jitter(rng, np.full(3, 0.9, np.float32), 0.05)])
    else:
      width = rng.uniform(0.3, 1.0)
      height = width * rng.uniform(0.6, 1.3)
      centre = rng.uniform(1.3, 1.7)
      v0, v1 = centre - height / 2, centre + height / 2
      colors = np.stack([pick(rng, _FABRICS, 0.3), pick(rng, _FABRICS, 0.3),
                         pick(rng, _WOODS) if rng.random() < 0.5 else
                         jitter(rng, np.full(3, 0.1, np.float32), 0.5)])
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
      material = Material("wood", pick(rng, _WOODS)[None], rng.uniform(0.08, 0.15), 0.15)
      top = rng.uniform(0.7, 0.78)
      boxes.append((np.array([x0, y0, top - 0.04]), np.array([x1, y1, top]), material))
      leg = 0.05
      for lx, ly in ((x0, y0), (x1 - leg, y0), (x0, y1 - leg), (x1 - leg, y1 - leg)):
        boxes.append((np.array([lx, ly, 0.0]), np.array([lx + leg, ly + leg, top]), material))
      continue
    if kind == "sofa":
      material = Material("fabric", pick(rng, _FABRICS, 0.2)[None], 0.05, 0.12)
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
      material = Material("wood", pick(rng, _WOODS)[None], rng.uniform(0.1, 0.3), 0.1)
    else:
      material = Material("paint", pick(rng, _WALL_PAINTS)[None], 0.5, 0.03)
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
  paint = pick(rng, _WALL_PAINTS, 0.08)
  walls = []
  for _ in range(4):
    accent = rng.random() < 0.15
    walls.append(_sample_wall(rng, pick(rng, _WALL_PAINTS) if accent else paint))
  decorations = tuple(
      _sample_decorations(rng, size[1] if wall < 2 else size[0], size[2]) for wall in range(4))
  rug = None
  if rng.random() < 0.4:
    rug_size = rng.uniform([1.0, 0.8], [2.5, 2.0])
    corner = rng.uniform([0.2, 1.0], np.maximum([0.3, 1.1], size[:2] - rug_size - 0.2))
    rug = Decoration("rug", corner[0], corner[0] + rug_size[0], corner[1],
                     corner[1] + rug_size[1],
                     np.stack([pick(rng, _FABRICS, 0.3), pick(rng, _FABRICS, 0.3)]))
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
      ceiling=jitter(rng, np.full(3, 0.93, np.float32), 0.04),
      walls=tuple(walls),
      decorations=decorations,
      rug=rug,
      lamp=lamp,
      lamp_color=_LIGHT_COLORS[rng.integers(len(_LIGHT_COLORS))] * rng.uniform(1.2, 2.2),
      lamp_falloff_m=rng.uniform(1.5, 3.5),
      ambient=jitter(rng, np.full(3, rng.uniform(0.3, 0.55), np.float32), 0.05),
      fill_direction=(fill_direction / np.linalg.norm(fill_direction)).astype(np.float32),
      fill_color=_LIGHT_COLORS[rng.integers(len(_LIGHT_COLORS))] * rng.uniform(0.0, 0.3),
      brightness=rng.uniform(0.45, 0.68),
      vignetting=rng.uniform(0.0, 0.35),
      noise=rng.random((NOISE_SIZE, NOISE_SIZE), dtype=np.float32),
  )
