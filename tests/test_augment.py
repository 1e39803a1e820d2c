"""The train step's augmentation (dmjax.data.augment) against PIL's resize and ImageEnhance, the
evaluation batches' resize, and hand-made cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from dmjax import config as config_lib
from dmjax.data import augment, pipeline, schema


def smooth_photo(size=80, seed=0):
  noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
  return np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5)))


@pytest.mark.parametrize("box", [(0, 0, 80, 80), (10.3, 5.7, 58.3, 53.7), (3, 7, 75, 79),
                                 (30, 30, 50, 50)])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_is_pils_bilinear_resize_of_the_box(box, flip):
  photo = smooth_photo()
  expected = Image.fromarray(photo).resize((64, 64), Image.Resampling.BILINEAR, box=box)
  if flip:
    expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  out = augment.crop_resize(jnp.asarray(photo, jnp.float32), jnp.array(box, jnp.float32),
                                   jnp.bool_(flip), 64)
  # PIL rounds to uint8; the rest is the same filter (down- and upscaling both).
  np.testing.assert_allclose(out, np.asarray(expected, np.float32), atol=1.01)


@pytest.mark.parametrize("factors", [(1.1, 0.9, 1.12), (0.85, 1.15, 0.85), (1.0, 1.0, 1.0)])
def test_photometric_jitter_is_pils_image_enhance(factors):
  photo = smooth_photo(32)
  image = Image.fromarray(photo)
  image = ImageEnhance.Brightness(image).enhance(factors[0])
  image = ImageEnhance.Contrast(image).enhance(factors[1])
  image = ImageEnhance.Color(image).enhance(factors[2])
  out = augment.jitter_photometric(jnp.asarray(photo, jnp.float32), jnp.array(factors))
  # PIL rounds to uint8 after each of its three steps (and the contrast mean to an integer).
  np.testing.assert_allclose(out, np.asarray(image, np.float32), atol=3.0)


def stored_example(size=40, seed=0):
  rng = np.random.default_rng(seed)
  photo = smooth_photo(size, seed)
  mask = np.asarray(Image.fromarray(photo[..., 0]).point(lambda v: 255 * (v > 128)))
  depth = (rng.random((size, size)) * 65535).astype(np.uint16)
  return {"bg": photo, "fg_bg": smooth_photo(size, seed + 1), "mask": mask[..., None],
          "depth": depth[..., None]}


def run_augment(batch, step=0, settings=None, resolution=32, binarize_mask=True, key=0):
  fn = jax.jit(functools.partial(augment.augment_batch, settings=settings,
                                 resolution=resolution, binarize_mask=binarize_mask))
  return jax.device_get(fn({k: jnp.asarray(v) for k, v in batch.items()},
                           jax.random.PRNGKey(key), step))


def test_without_augmentation_it_is_the_evaluation_batches_resize():
  examples = [stored_example(seed=s) for s in range(3)]
  batch = {key: np.stack([e[key] for e in examples]) for key in schema.KEYS}
  out = run_augment(batch)
  for i, example in enumerate(examples):
    expected = pipeline.prepare_eval_example(example, 32, binarize_mask=True)
    for key in schema.IMAGE_KEYS:  # Normalised: one uint8 level is 1 / (255 std) ≈ 0.021.
      np.testing.assert_allclose(out[key][i], expected[key], atol=1.01 / (255 * 0.189))
    np.testing.assert_allclose(out["depth"][i], expected["depth"], atol=1e-5)
    # Thresholding a resized edge: only pixels within float noise of 0.5 may differ.
    assert np.mean(out["mask"][i] != expected["mask"]) < 0.01


def test_the_four_images_share_one_geometry_and_each_photo_its_own_jitter():
  # All four images are the same x ramp, so any geometric difference shows as differing values.
  ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (40, 1))
  example = {"bg": np.stack([ramp] * 3, -1), "fg_bg": np.stack([ramp] * 3, -1),
             "mask": ramp[..., None], "depth": (ramp.astype(np.uint16) * 257)[..., None]}
  batch = {key: np.stack([value] * 8) for key, value in example.items()}
  still = augment.AugmentSettings(brightness=0.0, contrast=0.0, saturation=0.0, min_scale=0.5)
  out = run_augment(batch, settings=still, binarize_mask=False)
  bg = schema.denormalize_photo(out["bg"], "bg")[..., :1]
  np.testing.assert_allclose(out["mask"], bg, atol=1e-5)
  np.testing.assert_allclose(out["depth"], bg, atol=1e-5)
  flipped = out["mask"][:, 16, 0, 0] > out["mask"][:, 16, -1, 0]
  assert flipped.any() and not flipped.all()  # 8 draws, both directions.
  assert len({round(float(m), 4) for m in out["mask"][:, 16, 8, 0]}) == 8  # 8 different crops.

  jittered = run_augment(batch, settings=augment.AugmentSettings(), binarize_mask=False)
  assert not np.allclose(jittered["bg"], jittered["fg_bg"], atol=1e-3)


def test_draws_stay_within_their_ranges():
  settings = augment.AugmentSettings(min_scale=0.6, flip=True)
  keys = jax.random.split(jax.random.PRNGKey(3), 400)
  boxes, flips = jax.vmap(lambda k: augment.draw_geometry(k, 80, 60, settings))(keys)
  left, top, right, bottom = np.asarray(boxes).T
  assert left.min() >= 0 and top.min() >= 0 and right.max() <= 60 and bottom.max() <= 80
  scale = (bottom - top) / 80
  np.testing.assert_allclose((right - left) / 60, scale, rtol=1e-5)  # Aspect kept.
  assert 0.6 <= scale.min() < 0.62 and 0.98 < scale.max() <= 1.0
  assert 0.4 < np.mean(flips) < 0.6
  _, no_flips = jax.vmap(lambda k: augment.draw_geometry(
      k, 80, 60, augment.AugmentSettings(flip=False)))(keys)
  assert not np.any(no_flips)


def test_an_example_draws_by_its_step_and_place_only():
  examples = [stored_example(seed=s) for s in range(4)]
  batch = {key: np.stack([e[key] for e in examples]) for key in schema.KEYS}
  settings = augment.AugmentSettings()
  first = run_augment(batch, step=5, settings=settings)
  other = {key: value.copy() for key, value in batch.items()}
  for key in schema.KEYS:  # Other examples at places 0 and 1.
    other[key][:2] = other[key][2:][::-1]
  second = run_augment(other, step=5, settings=settings)
  for key in schema.KEYS:
    np.testing.assert_array_equal(first[key][2:], second[key][2:])
  later = run_augment(batch, step=6, settings=settings)
  assert not np.allclose(first["fg_bg"], later["fg_bg"])


def test_make_preprocess_follows_the_config():
  examples = [stored_example(seed=s) for s in range(2)]
  batch = {key: jnp.asarray(np.stack([e[key] for e in examples])) for key in schema.KEYS}
  config = config_lib.base_config()
  config.data.resolution = 16
  key = jax.random.PRNGKey(0)
  augmented = jax.device_get(augment.make_preprocess(config)(batch, key, 0))
  assert augmented["bg"].shape == (2, 16, 16, 3) and augmented["mask"].shape == (2, 16, 16, 1)
  assert set(np.unique(augmented["mask"])) <= {0.0, 1.0}
  config.data.augment.enabled = False
  config.data.binarize_mask = False
  plain = jax.device_get(augment.make_preprocess(config)(batch, key, 0))
  expected = run_augment({k: np.asarray(v) for k, v in batch.items()}, resolution=16,
                         binarize_mask=False)
  for name in schema.KEYS:  # Jitted here, not there: float rounding may differ.
    np.testing.assert_allclose(plain[name], expected[name], atol=1e-5)
  assert np.any((plain["mask"] > 0) & (plain["mask"] < 1))  # Soft edges kept.
  config.data.augment.min_scale = 0.0
  config.data.augment.enabled = True
  with pytest.raises(ValueError, match=r"config.data.augment.min_scale=0.0"):
    augment.make_preprocess(config)
