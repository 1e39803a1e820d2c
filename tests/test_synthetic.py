"""The built-in synthetic scenes and the trivial baselines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dmjax.data import schema, synthetic
from dmjax.evaluation import baselines

RESOLUTION = 48
# Shots that differ only by the object and its shadow: no misalignment, noise, blur, lighting
# change or JPEG loss to speak of.
CLEAN = synthetic.Realism(max_shift_px_at_80=0.0, jitter_px_at_80=0.0, exposure_mismatch=0.0,
                          white_balance_mismatch=0.0, lighting_tilt=0.0, noise_levels=(0.0, 0.0),
                          jpeg_quality=(95, 95), blur_probability=0.0)


def scenes(split="train", count=12, realism=synthetic.DEFAULT_REALISM, start=0):
  return [synthetic.render_scene(split, index, resolution=RESOLUTION, realism=realism)
          for index in range(start, start + count)]


def luminance(image):
  return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_examples_follow_the_schema(split):
  for index in range(4):
    example = synthetic.render_example(split, index, resolution=RESOLUTION)
    assert set(example) == set(schema.KEYS)
    for key, dtype, channels in (("bg", np.uint8, 3), ("fg_bg", np.uint8, 3),
                                 ("mask", np.uint8, 1), ("depth", np.uint16, 1)):
      assert example[key].dtype == dtype, key
      assert example[key].shape == (RESOLUTION, RESOLUTION, channels), key
    assert example["mask"].max() > 127  # An object is there...
    assert (example["mask"] == 0).mean() > 0.5  # ...on a background.
    depth_m = example["depth"] / schema.DEPTH_MAX_CODE * schema.SYNTHETIC_MAX_DEPTH_M
    assert 0.3 < depth_m.min() and depth_m.max() <= schema.SYNTHETIC_MAX_DEPTH_M


def test_unknown_split_is_refused():
  with pytest.raises(ValueError, match="validation"):
    synthetic.render_example("validation", 0)
  with pytest.raises(ValueError, match="index"):
    synthetic.render_example("train", -1)


def test_examples_are_deterministic_whatever_the_order():
  def render(index):
    return synthetic.render_example("train", index, resolution=RESOLUTION, seed=3)

  forward = [render(index) for index in (0, 1, 2, 200)]
  synthetic._ROOM_CACHE.clear()
  backward = [render(index) for index in (200, 2, 1, 0)][::-1]
  for first, second in zip(forward, backward, strict=True):
    for key in schema.KEYS:
      np.testing.assert_array_equal(first[key], second[key])
  # Example 200 shares its room and camera with example 0 but not its object.
  assert synthetic.room_seed("train", 200, seed=3) == synthetic.room_seed("train", 0, seed=3)
  assert not np.array_equal(forward[0]["mask"], forward[3]["mask"])
  for first, second in zip(forward, forward[1:], strict=False):
    assert not np.array_equal(first["fg_bg"], second["fg_bg"])
  other_seed = synthetic.render_example("train", 0, resolution=RESOLUTION, seed=4)
  assert not np.array_equal(other_seed["bg"], forward[0]["bg"])


def test_train_and_test_rooms_are_disjoint():
  train = {synthetic.room_seed("train", index) for index in range(3000)}
  test = {synthetic.room_seed("test", index) for index in range(3000)}
  assert len(train) == synthetic.NUM_ROOMS["train"]
  assert len(test) == synthetic.NUM_ROOMS["test"]
  assert not train & test
  scene = synthetic.render_scene("test", 7, resolution=RESOLUTION)
  assert scene.room_seed == synthetic.room_seed("test", 7)


def test_objects_range_from_specks_to_close_ups():
  areas = np.array([(scene.mask >= 128).mean() for scene in scenes(count=200)])
  assert (areas > 0).all()
  assert (areas < 0.01).mean() > 0.03  # Far away: under 1 % of the frame.
  assert (areas > 0.25).mean() > 0.01  # Close-ups: a quarter of the frame and more.
  assert areas.max() > 0.35


@pytest.mark.slow
def test_renders_larger_than_the_noise_bank():
  scene = synthetic.render_scene("test", 0, resolution=840)
  assert scene.fg_bg.shape == (840, 840, 3) and (scene.mask >= 128).any()


def test_masks_have_soft_edges():
  masks = np.stack([scene.mask for scene in scenes(count=6)])
  soft = (masks > 0) & (masks < 255)
  assert soft.sum() > 0.2 * (masks == 255).sum() ** 0.5 * len(masks)


def test_shadows_darken_the_floor_outside_the_mask():
  checked = 0
  for scene in scenes(count=12, realism=CLEAN) + scenes(count=12):
    outside = scene.mask[..., 0] == 0
    shaded = outside & (scene.shadow > 0.3)
    unshaded = outside & (scene.shadow == 0)
    if shaded.sum() < 4:
      continue
    checked += 1
    # fg_bg over bg: lower in the shadow than elsewhere, beyond noise and exposure changes.
    ratio = (luminance(scene.fg_bg) + 1) / (luminance(scene.bg) + 1)
    assert np.median(ratio[shaded]) < np.median(ratio[unshaded]) - 0.1
  assert checked >= 12
  for scene in scenes(count=6, realism=CLEAN):
    outside = scene.mask[..., 0] == 0
    difference = np.abs(scene.fg_bg.astype(int) - scene.bg.astype(int)).max(axis=-1)
    assert np.median(difference[outside & (scene.shadow == 0)]) <= 2  # JPEG only.
    if (outside & (scene.shadow > 0.3)).any():
      assert difference[outside & (scene.shadow > 0.3)].max() > 20


def test_the_object_stands_in_front_of_the_room():
  for scene in scenes(count=10) + scenes("test", count=10):
    front = scene.mask[..., 0] > 127
    room = np.round(np.clip(scene.room_depth_m / schema.SYNTHETIC_MAX_DEPTH_M, 0, 1)
                    * schema.DEPTH_MAX_CODE)
    assert front.any()
    # Up to a unit of float32 rounding in the depth codes.
    assert (scene.depth[..., 0][front] <= room[front] + 1).all()
    assert (scene.depth[..., 0][front] < room[front]).mean() > 0.99
    np.testing.assert_allclose(scene.depth[..., 0][~front], room[~front], atol=1)
    # It stands on the floor, where its feet are.
    assert scene.contact_point_m[2] == 0.0
    assert 0.2 < scene.object_height_m < 1.6


def test_depth_is_z_depth_of_the_floor_and_grows_towards_the_horizon():
  for scene in scenes(count=6):
    layout = synthetic.room_layout(0, scene.room_seed)
    floor = scene.surface == synthetic.FLOOR
    assert floor.mean() > 0.1
    # Floor points recovered from z-depth along rays with unit forward component lie on z = 0.
    centres = np.arange(RESOLUTION) + 0.5
    rays = layout.camera.rays(centres[:, None], centres[None, :], RESOLUTION)
    heights = layout.camera.position[2] + scene.room_depth_m * rays[..., 2]
    np.testing.assert_allclose(heights[floor], 0.0, atol=1e-3)
    # Perspective: a floor pixel is farther than the floor pixel below it.
    below = floor[:-1] & floor[1:]
    assert below.sum() > 20
    assert (scene.room_depth_m[:-1][below] > scene.room_depth_m[1:][below]).all()
    camera_height = layout.camera.position[2]
    assert synthetic.CAMERA_HEIGHT_RANGE_M[0] <= camera_height <= synthetic.CAMERA_HEIGHT_RANGE_M[1]


def test_mask_baseline_is_far_from_solving_the_test_split():
  def batch(split, count):
    examples = [synthetic.render_example(split, index, resolution=RESOLUTION)
                for index in range(count)]
    return tuple(np.stack([e[key] for e in examples]) / 255.0 for key in ("bg", "fg_bg", "mask"))

  model = baselines.DifferenceMaskBaseline().fit([batch("train", 100)])
  bg, fg_bg, mask = batch("test", 60)
  predicted = model.predict(bg, fg_bg) > 0.5
  target = mask >= 0.5
  iou = (predicted & target).sum() / (predicted | target).sum()
  assert 0.1 < iou < 0.6


def test_difference_baseline_finds_the_best_threshold():
  # Four one-pixel examples: any threshold in [0.1, 0.3) separates them perfectly.
  bg = np.zeros((4, 1, 1, 3), np.float32)
  fg_bg = np.zeros_like(bg)
  fg_bg[:, 0, 0, 2] = [0.05, 0.1, 0.3, 0.6]  # Only the blue channel differs: max, not mean.
  mask = np.array([0, 0, 1, 1], np.float32).reshape(4, 1, 1, 1)
  model = baselines.DifferenceMaskBaseline().fit([(bg[:2], fg_bg[:2], mask[:2]),
                                                  (bg[2:], fg_bg[2:], mask[2:])])
  assert model.threshold == pytest.approx(6.5 / 64)  # The lowest grid value above 0.1.
  assert model.train_iou == 1.0
  prediction = model.predict(bg, fg_bg)
  assert prediction.dtype == np.float32 and prediction.shape == (4, 1, 1, 1)
  np.testing.assert_array_equal(prediction, mask)

  # A trade-off: differences 0.3 (background), 0.4 and 0.2 (object). Calling everything the
  # object gives IoU 2/3; a threshold in [0.2, 0.3) gives 1/3, in [0.3, 0.4) gives 1/2.
  fg_bg = np.zeros((3, 1, 1, 3), np.float32)
  fg_bg[:, 0, 0, 0] = [0.3, 0.4, 0.2]
  mask = np.array([0.2, 0.9, 0.6], np.float32).reshape(3, 1, 1, 1)
  model = baselines.DifferenceMaskBaseline().fit([(np.zeros_like(fg_bg), fg_bg, mask)])
  assert model.threshold == pytest.approx(0.5 / 64)
  assert model.train_iou == pytest.approx(2 / 3)


def test_difference_baseline_round_trips_through_json():
  rng = np.random.default_rng(0)
  bg = rng.random((2, 8, 8, 3)).astype(np.float32)
  fg_bg = np.clip(bg + rng.normal(0, 0.2, bg.shape), 0, 1).astype(np.float32)
  mask = (np.abs(fg_bg - bg).max(-1, keepdims=True) > 0.25).astype(np.float32)
  model = baselines.DifferenceMaskBaseline().fit([(bg, fg_bg, mask)])
  restored = baselines.DifferenceMaskBaseline.from_dict(json.loads(json.dumps(model.to_dict())))
  assert restored.threshold == model.threshold
  np.testing.assert_array_equal(restored.predict(bg, fg_bg), model.predict(bg, fg_bg))
  with pytest.raises(ValueError, match="before fit"):
    baselines.DifferenceMaskBaseline().predict(bg, fg_bg)
  with pytest.raises(ValueError, match="type"):
    baselines.DifferenceMaskBaseline.from_dict({"type": "mean_depth"})


def test_mean_depth_baseline():
  first = np.full((2, 3, 4, 1), 0.25, np.float32)
  second = np.zeros((1, 3, 4, 1), np.float32)
  second[0, 0, 0, 0] = 0.75
  model = baselines.MeanDepthBaseline().fit([first, second])
  expected = np.full((3, 4, 1), 0.5 / 3, np.float32)
  expected[0, 0, 0] = 1.25 / 3
  np.testing.assert_allclose(model.mean, expected, rtol=1e-6)
  prediction = model.predict(5)
  assert prediction.shape == (5, 3, 4, 1) and prediction.dtype == np.float32
  restored = baselines.MeanDepthBaseline.from_dict(json.loads(json.dumps(model.to_dict())))
  np.testing.assert_array_equal(restored.predict(2), model.predict(2))
  with pytest.raises(ValueError, match="shape"):
    baselines.MeanDepthBaseline().fit([first, np.zeros((1, 4, 4, 1))])


def test_render_samples_writes_pngs_and_refuses_to_overwrite(tmp_path):
  command = [sys.executable, "-m", "dmjax.data.render_samples", f"--out={tmp_path}", "--num=2",
             "--resolution=32", "--split=test"]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")]))}
  subprocess.run(command, check=True, capture_output=True, env=env)
  names = sorted(os.listdir(tmp_path))
  assert "samples.png" in names and "test_00001_depth.png" in names and len(names) == 9
  again = subprocess.run(command, capture_output=True, text=True, env=env)
  assert again.returncode != 0
  assert "already exists" in again.stderr and "--overwrite" in again.stderr
  subprocess.run(command + ["--overwrite"], check=True, capture_output=True, env=env)
