"""The refined model, and the cascade that applies it to photos of any size
(dmjax.inference.cascade)."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from dmjax import config as config_lib
from dmjax import inference, losses, models
from dmjax.inference import cascade
from dmjax.inference import predictor as predictor_lib
from dmjax.models import refiner


class DifferenceNet(nn.Module):
  """A base with fixed weights: mask logits from |fg_bg − bg|, depth from the photo's rows.

  What a perfect base would do on clean pairs, so a cascade that loses track of where pixels
  are (a wrong resize, pad or crop) shows as disagreement between sizes."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, bg, fg_bg, train=False):
    del train
    difference = jnp.abs(fg_bg - bg).sum(axis=-1, keepdims=True)
    # Half of the largest difference: an edge pixel is the object's if it covers half of it.
    half = 0.5 * difference.max(axis=(1, 2, 3), keepdims=True)
    rows = jnp.linspace(-2.0, 2.0, bg.shape[1])[None, :, None, None]
    return {"mask": 8.0 * (difference - half) / half,
            "depth": jnp.broadcast_to(rows, difference.shape)}


def _disc_pair(height: int, width: int,
               radius: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A smooth background and the same with a disc (an ellipse in a non-square frame)."""
  rows = (np.arange(height) + 0.5) / height
  cols = (np.arange(width) + 0.5) / width
  red, green = np.broadcast_arrays(rows[:, None] * 200, cols[None, :] * 150)
  bg = np.stack([red, green, np.full_like(red, 80)], axis=-1)
  inside = ((rows[:, None] - 0.55) ** 2 / (1.5 * radius)**2
            + (cols[None, :] - 0.4) ** 2 / radius**2 < 1)
  fg_bg = np.where(inside[..., None], np.array([30.0, 220.0, 200.0]), bg)
  return bg.astype(np.uint8), fg_bg.astype(np.uint8), inside


def _difference_predictor(fit="auto", base_resolution=32, clean_mask=True) -> inference.Predictor:
  model = refiner.Refined(base=DifferenceNet(), features=4)
  size = 2 * base_resolution
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                         jnp.zeros((1, size, size, 3)))
  return inference.Predictor(model=model, variables=variables, resolution=size, fit=fit,
                             clean_mask=clean_mask)


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_each_pass_gives_the_model_the_photo_at_its_working_size():
  cascade_64 = _difference_predictor(base_resolution=64)._cascade
  # A refined model takes twice its base's working size, whatever the photo's size.
  assert cascade_64.input_size(512, 512, 64) == (128, 128)
  assert cascade_64.input_size(1536, 2048, 64) == (96, 128)
  # The whole photo with its base at 1.25 × 64; the object pass with its base at 1.5 × 64 (or
  # the window's own size, if smaller).
  assert cascade_64.working_sizes(1536, 2048) == {"frame": (120, 160), "object": (192, 192)}
  assert cascade_64.object_base_side(60) == 60
  unrefined = inference.Predictor(model=DifferenceNet(), variables={}, resolution=64)
  assert unrefined.working_sizes(512, 384) == {"frame": (80, 60), "object": (96, 96)}


def test_a_pass_at_the_models_own_size_is_the_plain_model():
  model = refiner.Refined(base=models.create_model(config_lib.stage_config(64, None).model).base,
                          features=4)
  bg, fg_bg, _ = _disc_pair(64, 64)
  bg, fg_bg = (jnp.asarray(x, jnp.float32)[None] / 255 for x in (bg, fg_bg))
  variables = model.init(jax.random.PRNGKey(0), bg, fg_bg)
  # A refiner that changes its input, so that the pass must include it.
  variables = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                           variables)
  plain = model.apply(variables, bg, fg_bg)
  passed = cascade.Cascade.of_model(model, variables, resolution=64)._pass(bg, fg_bg, 32)
  upsampled = refiner.upsample_logits(plain["coarse"], 64, 64)
  assert np.abs(np.asarray(plain["mask"]) - np.asarray(upsampled[0])).max() > 1e-2
  np.testing.assert_allclose(passed[0], plain["mask"], atol=1e-5)
  np.testing.assert_allclose(passed[1], plain["depth"], atol=1e-5)


def test_object_window_is_centred_on_the_object_and_round_trips():
  assert [cascade.window_side(x) for x in (1, 16, 16.5, 20, 32, 60, 150)] == [
      16, 16, 19, 23, 32, 64, 152]
  mask = np.full((100, 60), -1.0)
  mask[10:26, 30:38] = 1.0  # A 16 × 8 box centred on (18, 34): a window of 2 × 16.
  assert cascade.object_window(mask) == cascade.Window(top=2, left=18, side=32)
  mask[10:26, 54:60] = 1.0  # 30 wide: 60, up to 64, wider than the photo: the photo centred.
  assert cascade.object_window(mask) == cascade.Window(top=0, left=-2, side=64)
  assert cascade.object_window(np.full((8, 8), -1.0)) is None
  # Larger than the photo both ways: not cut, the photo in its middle.
  wide = cascade.object_window(mask, context=5.0)
  assert wide == cascade.Window(top=-26, left=-46, side=152)
  photo = np.random.default_rng(0).random((1, 100, 60, 3))
  crop = cascade.crop_window(photo, wide)
  assert crop.shape == (1, 152, 152, 3)
  np.testing.assert_array_equal(crop[0, 26:126, 46:106], photo[0])
  np.testing.assert_array_equal(crop[0, 26:126, :46], np.repeat(photo[0, :, :1], 46, axis=1))
  np.testing.assert_array_equal(crop[0, :26, 46:106], np.repeat(photo[0, :1], 26, axis=0))
  canvas = np.zeros((100, 60, 3))
  cascade.paste_window(canvas, crop[0], wide)
  np.testing.assert_array_equal(canvas, photo[0])
  inner = cascade.Window(top=30, left=10, side=16)
  canvas = np.zeros((100, 60, 3))
  cascade.paste_window(canvas, cascade.crop_window(photo, inner)[0], inner)
  np.testing.assert_array_equal(canvas[30:46, 10:26], photo[0, 30:46, 10:26])
  assert canvas.sum() == photo[0, 30:46, 10:26].sum()


def test_small_object_in_a_large_photo_is_found_and_segmented_up_close():
  predictor = _difference_predictor()  # Pass 1's base at 40 px: the disc is 2 px wide there.
  bg, fg_bg, truth = _disc_pair(512, 512, radius=0.02)
  mask, _ = predictor(bg, fg_bg)
  assert _iou(mask > 0.5, truth) >= 0.85
  frame_only, _ = predictor._cascade._pass(
      *(jnp.asarray(x, jnp.float32)[None] / 255 for x in (bg, fg_bg)),
      predictor._cascade.frame_base)
  assert _iou(np.asarray(frame_only[0, ..., 0]) > 0, truth) < 0.85


def test_same_scene_at_two_sizes_gives_the_same_mask():
  predictor = _difference_predictor()
  small_bg, small_fg_bg, small_truth = _disc_pair(96, 160)
  large_bg, large_fg_bg, _ = _disc_pair(384, 640)
  small, _ = predictor(small_bg, small_fg_bg)
  large, _ = predictor(large_bg, large_fg_bg)
  assert small.shape == (96, 160) and large.shape == (384, 640)
  large_at_small = predictor_lib._resize_map(large, (160, 96))
  assert _iou(small > 0.5, large_at_small > 0.5) >= 0.9
  assert _iou(small > 0.5, small_truth) >= 0.9  # And both are right, not both empty.


def test_auto_fit_fills_the_masks_holes_and_drops_its_specks_unless_told_not_to():
  bg, fg_bg, truth = _disc_pair(256, 256)
  # A patch of the object that looks like the background and a difference that is not the
  # object, each 3–5 % of its area.
  hole, speck = (slice(128, 152), slice(90, 114)), (slice(16, 36), slice(210, 230))
  fg_bg[hole] = bg[hole]
  fg_bg[speck] = (30, 220, 200)
  raw, _ = _difference_predictor(clean_mask=False)(bg, fg_bg)
  assert (raw[136:144, 98:106] < 0.5).all() and (raw[speck] > 0.5).any()
  cleaned, _ = _difference_predictor()(bg, fg_bg)
  assert (cleaned[hole] > 0.5).all() and (cleaned[speck] < 0.5).all()
  assert _iou(cleaned > 0.5, truth) > _iou(raw > 0.5, truth)


def test_depth_comes_from_the_whole_photo_pass():
  predictor = _difference_predictor()  # Base trained (as it were) at 32 px.
  bg, fg_bg, _ = _disc_pair(256, 256)
  _, depth = predictor(bg, fg_bg)
  # The base at 1.25 × 32 = 40 px: the refined model is given 80 px, padded to 96 (a multiple
  # of 32), so the base sees 48 rows; the (untrained) refiner returns its logits upsampled to
  # 96, whose first 80 rows are the photo, resized to 256.
  rows = jnp.asarray(np.linspace(-2.0, 2.0, 48)[None, :, None, None] * np.ones((1, 1, 48, 1)))
  at_96 = jax.image.resize(rows, (1, 96, 96, 1), "linear")
  expected = jax.image.resize(at_96[:, :80, :80], (1, 256, 256, 1), "linear")[0, ..., 0]
  np.testing.assert_allclose(depth, jax.nn.sigmoid(expected), atol=1e-5)


def test_refined_training_step_and_window_loss():
  config = config_lib.stage_config(64, None)
  model = models.create_model(config.model)
  assert isinstance(model, refiner.Refined)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images, images)
  window = 24
  model = model.clone(train_window=window)
  outputs, _ = model.apply(variables, images, images + 1.0, train=True, mutable=["batch_stats"])
  assert outputs["mask"].shape == (2, window, window, 1)
  assert outputs["coarse"]["mask"].shape == (2, 32, 32, 1)
  labels = {"mask": (images[..., :1] > 0).astype(jnp.float32),
            "depth": jax.nn.sigmoid(images[..., 1:2])}
  total, terms = losses.compute_losses(outputs, labels, config.loss)
  # The window's labels, cropped by hand, and the base's, resized: the same total.
  top_left = np.asarray(outputs["window"])
  cropped = {k: jnp.stack([v[i, t:t + window, s:s + window] for i, (t, s) in enumerate(top_left)])
             for k, v in labels.items()}
  refined_total, _ = losses.compute_losses({k: outputs[k] for k in ("mask", "depth")}, cropped,
                                           dict(config.loss, coarse=0.0))
  coarse_labels = {k: jax.image.resize(v, (2, 32, 32, 1), "linear", antialias=True)
                   for k, v in labels.items()}
  coarse_total, _ = losses.compute_losses(outputs["coarse"], coarse_labels,
                                          dict(config.loss, coarse=0.0))
  np.testing.assert_allclose(total, refined_total + config.loss.coarse * coarse_total, rtol=1e-5)
  np.testing.assert_allclose(terms["coarse"], coarse_total, rtol=1e-5)


def test_untrained_refiner_returns_the_upsampled_logits():
  model = refiner.Refined(base=DifferenceNet(), features=4)
  bg, fg_bg, _ = _disc_pair(64, 64)
  bg, fg_bg = (jnp.asarray(x, jnp.float32)[None] / 255 for x in (bg, fg_bg))
  variables = model.init(jax.random.PRNGKey(0), bg, fg_bg)
  outputs = model.apply(variables, bg, fg_bg)
  upsampled = refiner.upsample_logits(outputs["coarse"], 64, 64)
  np.testing.assert_allclose(outputs["mask"], upsampled[0], atol=1e-6)


@pytest.mark.slow
def test_large_photo_stays_under_the_memory_bound():
  """A 2048 × 1536 pair through the default model's cascade, in a fresh process."""
  script = """
import numpy as np, jax, jax.numpy as jnp
from dmjax import config as config_lib, inference, models
config = config_lib.stage_config(64, None)
model = models.create_model(config.model)
size = config.data.resolution
variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                       jnp.zeros((1, size, size, 3)))
predictor = inference.Predictor(model=model, variables=variables, resolution=size)
rng = np.random.default_rng(0)
bg = rng.integers(0, 256, (1536, 2048, 3), np.uint8)
mask, depth = predictor(bg, bg)
assert mask.shape == (1536, 2048) and depth.shape == (1536, 2048)
from dmjax.benchmark import timing
print(timing.own_peak_rss_bytes())
"""
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=600,
                        capture_output=True, text=True)
  peak_bytes = int(done.stdout.split()[-1])
  assert peak_bytes < 3 << 30, f"peak RSS {peak_bytes / 2**30:.2f} GiB"


def test_teacher_forcing_inside_a_refined_model_is_refused():
  config = config_lib.stage_config(64, "model=two_stage")
  config.model.teacher_forcing_steps = 10
  with pytest.raises(ValueError, match="teacher_forcing_steps"):
    models.create_model(config.model)
