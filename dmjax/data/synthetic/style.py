"""Object style: the coat (colours, pattern, fur) an object is drawn with."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dmjax.data.synthetic.shapes import AnimalShape
from dmjax.data.synthetic.textures import fractal, jitter, noise, pick

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


def sample_style(rng: np.random.Generator, background: np.ndarray | None) -> _Style:
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
      main = pick(rng, _FUR, 0.15)
    second = pick(rng, _FUR, 0.15)
    pattern = _PATTERNS[rng.integers(len(_PATTERNS))]
    fur = rng.uniform(0.1, 0.35)
  return _Style(np.stack([main, second]), pattern, fur, rng.uniform(0.06, 0.15),
                rng.uniform(-0.5, 0.5), jitter(rng, np.full(3, 0.06, np.float32), 0.5))


def object_albedo(style: _Style, shape: AnimalShape, u: np.ndarray, v: np.ndarray,
                   table: np.ndarray) -> np.ndarray:
  height = shape.bounds()[3]
  s, t = u / height, v / height
  main, second = style.colors
  fur = (noise(table, s * 40, t * 40) - 0.5) * 0.6 + (noise(table, s * 12, t * 12) - 0.5) * 0.4
  if style.pattern == "tabby":
    wave = np.sin((s * math.cos(style.stripe_angle) + t * math.sin(style.stripe_angle))
                  * (2 * math.pi / style.period) + 3 * noise(table, s * 6, t * 6))
    weight = np.clip(wave * 2, 0, 1)
  elif style.pattern == "patches":
    weight = np.clip((fractal(table, s * 3 + 9, t * 3, 2) - 0.5) * 8 + 0.5, 0, 1)
  elif style.pattern == "spots":
    weight = np.clip((noise(table, s / style.period, t / style.period + 5) - 0.7) * 10, 0, 1)
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
