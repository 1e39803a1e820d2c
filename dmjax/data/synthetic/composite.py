"""Compositing one example: the object placed on the floor and drawn with its shadows, and the
room photographed twice (bg and fg_bg) with the differences `Realism` sets.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image

from dmjax.data import schema
from dmjax.data.synthetic.rooms import FLOOR, MAX_SHIFT_PX_AT_80, RoomLayout, focal_length_px
from dmjax.data.synthetic.shading import PLACEMENT_GRID, RoomImage, lamp_light
from dmjax.data.synthetic.shapes import TEMPLATES, AnimalShape
from dmjax.data.synthetic.style import object_albedo, sample_style
from dmjax.data.synthetic.textures import NOISE_SIZE

_EDGE = 1 / 80  # Margin objects keep from the image border, as a fraction of its side.

# Share of examples framed as a close-up: the object stands nearer than the bottom of the frame,
# so its feet or sides may be cut off and it can fill most of the image (photos of a pet).
CLOSEUP_PROBABILITY = 0.25
_CLOSEUP_HEIGHT_GAIN = (1.2, 2.2)  # Close-up objects are drawn this much taller.


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


@dataclasses.dataclass(frozen=True)
class _Placement:
  shape: AnimalShape  # Scaled to its height in metres.
  contact: np.ndarray  # (3,) on the floor.
  normal: np.ndarray  # (3,) horizontal unit vector from the camera towards the object.
  across: np.ndarray  # (3,) horizontal unit vector to the camera's right on the object's plane.
  facing: float  # +1: the head points to the right of the image; -1: to the left.
  box: tuple[int, int, int, int]  # Pixel rows [r0, r1) and columns [c0, c1) to draw in.


def _place_object(layout: RoomLayout, room_image: RoomImage, resolution: int,
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
  row, col = divmod(int(floor[rng.integers(len(floor), size=2)].max()), PLACEMENT_GRID)
  cell = resolution / PLACEMENT_GRID
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


def _draw_object(layout: RoomLayout, room_image: RoomImage, placement: _Placement,
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


def _draw_shadow(layout: RoomLayout, room_image: RoomImage, placement: _Placement,
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


def render_composite(layout: RoomLayout, room_image: RoomImage, room: int, resolution: int,
                      rng: np.random.Generator, realism: Realism) -> SyntheticScene:
  margin = room_image.margin
  template, height_range = TEMPLATES[rng.integers(len(TEMPLATES))]
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
    style = sample_style(rng, behind.mean(axis=1) if camouflage and behind.size else None)
    table = rng.random((NOISE_SIZE, NOISE_SIZE), dtype=np.float32)
    albedo = object_albedo(style, shape, drawn.u, drawn.v, table)
    if camouflage:  # Keep the borrowed colour as the camera sees it.
      light = np.ones((3, 1, 1), np.float32)
      shading = 0.8 + 0.2 * drawn.roundness
    else:
      # Lit by the lamp at the object's middle; rounder parts face the light, the top more so.
      centre = contact + (0.0, 0.0, height / 2)
      facing_camera = -placement.normal + (0.0, 0.0, 0.5)
      facing_camera /= np.linalg.norm(facing_camera)
      light = lamp_light(layout, centre[None].astype(np.float32),
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
