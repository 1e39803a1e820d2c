"""What the train step does to a batch: the host sends stored uint8, the step augments.

Training batches leave the host as stored (`dmjax.data.schema`: uint8 photos and mask, uint16
depth, all at `data.transfer_resolution`; `dmjax.data.pipeline` only gathers them) and
`augment_batch`, run at the start of the jitted train step (`make_preprocess`), turns them into
model inputs: one joint geometry, photometric jitter, resizing to `data.resolution`, and
normalisation. At GPU rates the host could not crop, resize and jitter tens of thousands of
quartets a second with PIL (a few hundred per core); on a CPU, augmenting in XLA costs the step
less than PIL costs the host.

One geometric draw (horizontal flip, crop box) applies to all four images so they stay aligned,
which the original system could not do (SPEC §5): a mirror coin, a crop scale in [min_scale, 1]
of each side (aspect kept) and a uniform offset. Photometric jitter applies only to the two
photos, drawn independently for each, so the model sees bg and fg_bg shot under slightly
different light: brightness, contrast and saturation factors in [1 - s, 1 + s], in PIL's
ImageEnhance formulas and order (what torchvision's ColorJitter does to PIL images). The
resampling is PIL's bilinear filter: a triangle widened by the downscale factor, so shrinking
averages the area instead of aliasing.

Example i of the global batch of step t draws from fold_in(fold_in(key, t), i): the same however
many devices or processes share the batch, and the same again when a run resumes at step t.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmjax import errors
from dmjax.data import schema

# PIL's "L" conversion (ITU-R 601-2 luma), which ImageEnhance.Contrast and Color blend towards.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """What `config.data.augment` asks for; plain, hashable values (a static argument of jit)."""

  flip: bool = True
  min_scale: float = 0.6
  brightness: float = 0.15
  contrast: float = 0.15
  saturation: float = 0.15

  @classmethod
  def from_config(cls, augment_config) -> AugmentSettings | None:
    """The settings, or None when `augment_config.enabled` is False."""
    if not augment_config.enabled:
      return None
    if not 0.0 < augment_config.min_scale <= 1.0:
      raise errors.UserError(f"config.data.augment.min_scale={augment_config.min_scale}: expected "
                             "a value in (0, 1]")
    return cls(flip=bool(augment_config.flip), min_scale=float(augment_config.min_scale),
               brightness=float(augment_config.brightness),
               contrast=float(augment_config.contrast),
               saturation=float(augment_config.saturation))


def make_preprocess(config: ml_collections.ConfigDict):
  """`preprocess(batch, key, step)` for the train step: `augment_batch` with `config.data`'s
  settings (without augmentation, only the resize and normalisation)."""
  return functools.partial(
      augment_batch, resolution=config.data.resolution,
      settings=AugmentSettings.from_config(config.data.augment),
      binarize_mask=bool(config.data.binarize_mask))


def crop_resize(image: jax.Array, box: jax.Array, flip: jax.Array, resolution: int) -> jax.Array:
  """(H, W, C) float → (R, R, C): the crop `box` = (left, top, right, bottom) in source pixels,
  resized as PIL's bilinear `resize(box=...)` does, then mirrored if `flip`."""
  left, top, right, bottom = box[0], box[1], box[2], box[3]
  scale = jnp.stack([resolution / (bottom - top), resolution / (right - left)])
  translation = -jnp.stack([top, left]) * scale
  out = jax.image.scale_and_translate(image, (resolution, resolution, image.shape[-1]), (0, 1),
                                      scale, translation, method="linear", antialias=True)
  return jnp.where(flip, out[:, ::-1], out)


def jitter_photometric(image: jax.Array, factors: jax.Array) -> jax.Array:
  """PIL's ImageEnhance Brightness, Contrast, Color by `factors` (3,), in that order, on an
  (H, W, 3) float image in [0, 255]; PIL rounds to uint8 between steps, this does not."""
  brightness, contrast, saturation = factors[0], factors[1], factors[2]
  image = jnp.clip(image * brightness, 0.0, 255.0)
  mean_luma = jnp.mean(image @ _LUMA)
  image = jnp.clip(mean_luma + contrast * (image - mean_luma), 0.0, 255.0)
  luma = (image @ _LUMA)[..., None]
  return jnp.clip(luma + saturation * (image - luma), 0.0, 255.0)


def draw_geometry(key: jax.Array, height: int, width: int,
                  settings: AugmentSettings) -> tuple[jax.Array, jax.Array]:
  """(box, flip): a random crop covering [min_scale, 1] of each side (aspect kept), placed
  uniformly, and a coin-flip mirror."""
  flip_key, scale_key, top_key, left_key = jax.random.split(key, 4)
  flip = jnp.logical_and(jax.random.uniform(flip_key) < 0.5, settings.flip)
  scale = jax.random.uniform(scale_key, minval=settings.min_scale, maxval=1.0)
  crop_height, crop_width = scale * height, scale * width
  top = jax.random.uniform(top_key) * (height - crop_height)
  left = jax.random.uniform(left_key) * (width - crop_width)
  return jnp.stack([left, top, left + crop_width, top + crop_height]), flip


def _draw_factors(key: jax.Array, settings: AugmentSettings) -> jax.Array:
  spread = jnp.array([settings.brightness, settings.contrast, settings.saturation], jnp.float32)
  return 1.0 + jax.random.uniform(key, (3,), minval=-1.0, maxval=1.0) * spread


def _augment_example(example: dict[str, jax.Array], key: jax.Array, *,
                     settings: AugmentSettings | None, resolution: int,
                     binarize_mask: bool) -> dict[str, jax.Array]:
  height, width = example["fg_bg"].shape[:2]
  geometry_key, bg_key, fg_bg_key = jax.random.split(key, 3)
  if settings is None:
    box, flip = jnp.array([0.0, 0.0, width, height], jnp.float32), jnp.bool_(False)
  else:
    box, flip = draw_geometry(geometry_key, height, width, settings)
  resize = functools.partial(crop_resize, box=box, flip=flip, resolution=resolution)

  out = {}
  for name, photo_key in (("bg", bg_key), ("fg_bg", fg_bg_key)):
    photo = resize(example[name].astype(jnp.float32))
    if settings is not None:
      photo = jitter_photometric(photo, _draw_factors(photo_key, settings))
    scale, offset = schema.photo_normalization(name)
    out[name] = photo * scale + offset
  mask = jnp.clip(resize(example["mask"].astype(jnp.float32) / 255.0), 0.0, 1.0)
  out["mask"] = (mask > 0.5).astype(jnp.float32) if binarize_mask else mask
  out["depth"] = jnp.clip(resize(example["depth"].astype(jnp.float32) / schema.DEPTH_MAX_CODE),
                          0.0, 1.0)
  return out


def augment_batch(batch: dict[str, jax.Array], key: jax.Array, step: jax.Array, *,
                  settings: AugmentSettings | None, resolution: int,
                  binarize_mask: bool) -> dict[str, jax.Array]:
  """A stored-format global batch → model inputs.

  `batch`: `bg`, `fg_bg` uint8 (B, H, W, 3), `mask` uint8 and `depth` uint16 (B, H, W, 1).
  Returns float32 `bg`, `fg_bg` normalised (dmjax.data.schema), `mask` (thresholded at 0.5 if
  `binarize_mask`) and `depth` in [0, 1], all (B, R, R, C). Without settings the full frame is
  only resized, as evaluation batches are (`dmjax.data.pipeline.create_eval_batches`).
  """
  step_key = jax.random.fold_in(key, step)
  keys = jax.vmap(functools.partial(jax.random.fold_in, step_key))(
      jnp.arange(batch["fg_bg"].shape[0]))
  example = {k: batch[k] for k in schema.KEYS}
  return jax.vmap(functools.partial(_augment_example, settings=settings, resolution=resolution,
                                    binarize_mask=binarize_mask))(example, keys)
