"""The refined model and the inference cascade that predicts at the photo's own size."""

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


def _disc_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A smooth background and the same with a disc (an ellipse in a non-square frame)."""
  rows = (np.arange(height) + 0.5) / height
  cols = (np.arange(width) + 0.5) / width
  red, green = np.broadcast_arrays(rows[:, None] * 200, cols[None, :] * 150)
  bg = np.stack([red, green, np.full_like(red, 80)], axis=-1)
  inside = (rows[:, None] - 0.55) ** 2 / 0.3**2 + (cols[None, :] - 0.4) ** 2 / 0.2**2 < 1
  fg_bg = np.where(inside[..., None], np.array([30.0, 220.0, 200.0]), bg)
  return bg.astype(np.uint8), fg_bg.astype(np.uint8), inside


def _difference_predictor(fit="auto", base_resolution=32) -> inference.Predictor:
  model = refiner.Refined(base=DifferenceNet(), features=4)
  size = 2 * base_resolution
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                         jnp.zeros((1, size, size, 3)))
  return inference.Predictor(model=model, variables=variables, resolution=size, fit=fit)


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_cascade_sizes_double_up_to_the_photo():
  # The base's long side is halved until at most MAX_BASE_ZOOM (3.5) times its training size.
  assert refiner.cascade_sizes(512, 512, 64, True) == [(128, 128), (256, 256), (512, 512)]
  # Non-square: the long side decides; the last level is the photo itself.
  assert refiner.cascade_sizes(1536, 2048, 64, True)[0] == (96, 128)
  assert refiner.cascade_sizes(1536, 2048, 64, True)[-1] == (1536, 2048)
  # At least one refinement step, even where the base could take the whole photo.
  assert refiner.cascade_sizes(192, 192, 64, True) == [(96, 96), (192, 192)]
  # Without a refiner, one level: the base at its working size.
  assert refiner.cascade_sizes(512, 512, 64, False) == [(128, 128)]


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


def test_depth_comes_from_the_base_at_its_own_working_size():
  predictor = _difference_predictor()  # Base trained (as it were) at 32 px.
  bg, fg_bg, _ = _disc_pair(256, 256)
  _, depth = predictor(bg, fg_bg)
  # Masks: base at 64 (256 halved twice, ≤ 3.5 × 32); depth: base at 32 (≤ 1.75 × 32).
  assert refiner.cascade_sizes(256, 256, 32, True)[0] == (64, 64)
  rows = np.linspace(-2.0, 2.0, 32)[:, None] * np.ones((1, 32))
  expected = jax.image.resize(jnp.asarray(rows), (256, 256), "linear")
  np.testing.assert_allclose(depth, jax.nn.sigmoid(expected), atol=1e-5)


def test_refining_in_bands_equals_one_call():
  model = refiner.Refiner(features=4)
  shape = (2, 70, 40, 3)
  key = jax.random.split(jax.random.PRNGKey(1), 5)
  bg, fg_bg = (jax.random.normal(k, shape) for k in key[:2])
  mask, depth = (jax.random.normal(k, shape[:3] + (1,)) for k in key[2:4])
  variables = model.init(key[4], bg, fg_bg, mask, depth)
  # Non-zero last conv and BatchNorm statistics, so the refiner changes its input.
  variables = jax.tree.map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                           variables)
  refine = jax.jit(lambda *a: model.apply(variables, *a))
  whole = refine(bg, fg_bg, mask, depth)
  banded = refiner.refine_in_bands(refine, bg, fg_bg, mask, depth, band_rows=16)
  assert not np.allclose(whole[0], mask)
  for expected, actual in zip(whole, banded, strict=True):
    np.testing.assert_allclose(actual, expected, atol=1e-5)


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
