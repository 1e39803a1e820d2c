"""Animal-like shapes: signed distances on the object's plane (u right, v up), drawn from the
templates of a quadruped, a sitting animal and a bird (`TEMPLATES`).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

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


TEMPLATES = ((_quadruped, (0.6, 1.5)), (_sitting, (0.55, 1.3)), (_bird, (0.5, 1.2)))
