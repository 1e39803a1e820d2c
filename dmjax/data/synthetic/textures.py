"""Procedural textures: value noise, and the albedo of room materials and wall decorations."""

from __future__ import annotations

import dataclasses

import numpy as np

NOISE_SIZE = 64  # Side of the value-noise lattice; a power of two so indices wrap with `&`.


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


def jitter(rng: np.random.Generator, color: np.ndarray, amount: float) -> np.ndarray:
  tone = rng.uniform(1 - amount, 1 + amount)
  tint = rng.uniform(1 - amount / 2, 1 + amount / 2, 3)
  return np.clip(color * tone * tint, 0.02, 1.0).astype(np.float32)


def pick(rng: np.random.Generator, palette: np.ndarray, amount: float = 0.12) -> np.ndarray:
  return jitter(rng, palette[rng.integers(len(palette))], amount)


def noise(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
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


def fractal(table: np.ndarray, x: np.ndarray, y: np.ndarray, octaves: int = 3) -> np.ndarray:
  total, weight, norm = 0.0, 1.0, 0.0
  for octave in range(octaves):
    scale = 2.0**octave
    total = total + weight * noise(table, x * scale + 17.3 * octave, y * scale + 5.1 * octave)
    norm += weight
    weight *= 0.5
  return total / norm


def _cell(table: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
  """A random value in [0, 1] per integer cell (i, j)."""
  mask = table.shape[0] - 1
  i = i.astype(np.int32)
  j = j.astype(np.int32)
  return table[i & mask, (j * 7 + i * 3 + 11) & mask]


def material_albedo(material: Material, u: np.ndarray, v: np.ndarray,
                     table: np.ndarray) -> np.ndarray:
  colors = material.colors
  grain = fractal(table, u / 0.3, v / 0.3) - 0.5
  if material.kind == "wood":
    width = material.scale
    plank = np.floor(u / width)
    along = v + _cell(table, plank, plank + 5) * 3.0
    board = np.floor(along / (width * 9))
    tone = 1 + material.contrast * (2 * _cell(table, plank, board) - 1)
    streaks = noise(table, u / width * 6, along * 1.5) - 0.5
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
    fine = noise(table, u / 0.02, v / 0.02) - 0.5
    return colors[0] * (1 + material.contrast * (fine + grain))[:, None]
  return colors[0] * (1 + material.contrast * 2 * grain)[:, None]  # paint


def decoration_albedo(decoration: Decoration, u: np.ndarray, v: np.ndarray,
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
    sky = sky + 0.15 * (fractal(table, u / 0.4, v / 0.25) - 0.5)[:, None]
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
    fine = noise(table, u / 0.02, v / 0.02) - 0.5
    return albedo * (1 + 0.15 * fine)[:, None], np.zeros(len(u), bool)
  # Picture: a frame around a blurry two-colour painting.
  blend = fractal(table, u / 0.15 + 3.0, v / 0.15, octaves=2)[:, None]
  painting = colors[0] * blend + colors[1] * (1 - blend)
  return np.where((edge < 0.04)[:, None], colors[2], painting), np.zeros(len(u), bool)
