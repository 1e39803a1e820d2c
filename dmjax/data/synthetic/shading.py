"""Ray casting and shading of the empty room: the depth, surface and colour of every pixel,
rendered once per room and resolution (`render_room`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dmjax.data.synthetic.rooms import (
  CEILING,
  FIRST_BOX,
  FLOOR,
  MAX_SHIFT_PX_AT_80,
  WALL_X0,
  WALL_X1,
  WALL_Y0,
  WALL_Y1,
  RoomLayout,
)
from dmjax.data.synthetic.textures import Material, decoration_albedo, material_albedo, noise

# Objects are placed on a grid of floor cells of this many rows and columns, and image margins are
# fractions of the image, so an example shows the same scene at every resolution.
PLACEMENT_GRID = 64


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
    albedo[index] = material_albedo(material, su + offset, sv, table)
    for decoration in decorations:
      inside = ((su >= decoration.u0) & (su <= decoration.u1) & (sv >= decoration.v0)
                & (sv <= decoration.v1))
      if inside.any():
        color, glow = decoration_albedo(decoration, su[inside], sv[inside], table)
        albedo[index[inside]] = color
        glows[index[inside]] = glow

  paint(hits.surface == FLOOR, layout.floor, () if layout.rug is None else (layout.rug,))
  ceiling = hits.surface == CEILING
  albedo[ceiling] = layout.ceiling * (0.97 + 0.06 * noise(table, u[ceiling], v[ceiling]))[:, None]
  for wall in range(4):
    selected = hits.surface == WALL_X0 + wall
    paint(selected, layout.walls[wall], layout.decorations[wall], offset=13.0 * wall)
    # A skirting board along the floor.
    skirting = selected & (v < 0.08)
    albedo[skirting] = albedo[skirting] * 0.3 + 0.6 * layout.ceiling
  for box, material in enumerate(layout.box_materials):
    paint(hits.surface == FIRST_BOX + box, material, offset=7.0 * box)
  return albedo, glows


def lamp_light(layout: RoomLayout, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
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
class RoomImage:
  # (3, C, C) float32 with `margin` extra pixels on each side. Per-example image work is done
  # channels-first: numpy broadcasts over a trailing axis of 3 many times slower.
  color: np.ndarray
  depth: np.ndarray  # (R, R) float32 z-depth in metres at the fg_bg frame's pixel centres.
  surface: np.ndarray  # (R, R) int16
  floor_cells: np.ndarray  # Flat indices of PLACEMENT_GRID cells whose centre sees floor.
  margin: int
  exposure: float  # Scale the camera applied to irradiance x albedo.

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.color, self.depth, self.surface, self.floor_cells))


def _margin(resolution: int) -> int:
  return math.ceil(MAX_SHIFT_PX_AT_80 * resolution / 80) + 1


def render_room(layout: RoomLayout, resolution: int) -> RoomImage:
  margin = _margin(resolution)
  canvas = resolution + 2 * margin
  # Colour: 2 x 2 samples per pixel, so edges and distant textures are antialiased.
  samples = (np.arange(2 * canvas, dtype=np.float32) + 0.5) / 2 - margin
  directions = layout.camera.rays(samples[:, None], samples[None, :], resolution)
  hits = _cast(layout, directions.reshape(-1, 3))
  albedo, glows = _room_albedo(layout, hits)
  light = lamp_light(layout, hits.points, hits.normals) * _occlusion(layout, hits)[:, None]
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
  cells = (np.arange(PLACEMENT_GRID - 1, dtype=np.float32) + 0.5) * (resolution / PLACEMENT_GRID)
  cell_columns = (np.arange(PLACEMENT_GRID, dtype=np.float32) + 0.5) * (
      resolution / PLACEMENT_GRID)
  directions = layout.camera.rays(cells[:, None], cell_columns[None, :], resolution)
  floor_cells = np.flatnonzero(_cast(layout, directions.reshape(-1, 3)).surface == FLOOR)
  return RoomImage(
      color=color,
      depth=hits.depth.reshape(resolution, resolution).astype(np.float32),
      surface=surface,
      floor_cells=floor_cells.astype(np.int32),
      margin=margin,
      exposure=exposure,
  )
