"""dmjax.inference.outputs: the cut-out and the new background, against values by hand."""

import numpy as np
import pytest

from dmjax import errors
from dmjax.inference import outputs


def _pair():
  fg_bg = np.array([[[200, 100, 0], [10, 20, 30]],
                    [[255, 255, 255], [0, 0, 0]]], np.uint8)
  mask = np.array([[0.25, 1.0], [0.0, 0.5]], np.float32)
  return fg_bg, mask


def test_cutout_is_the_composite_with_the_soft_mask_as_alpha():
  fg_bg, mask = _pair()
  rgba = outputs.cutout_rgba(fg_bg, mask)
  assert rgba.dtype == np.uint8 and rgba.shape == (2, 2, 4)
  np.testing.assert_array_equal(rgba[..., :3], fg_bg)
  # 0.25 · 255 = 63.75 → 64; 0.5 · 255 = 127.5 → 128 (round half to even).
  np.testing.assert_array_equal(rgba[..., 3], [[64, 255], [0, 128]])


def test_replace_background_blends_by_the_soft_mask():
  fg_bg, mask = _pair()
  new_bg = np.array([[[0, 100, 200], [50, 50, 50]],
                     [[0, 0, 0], [100, 200, 250]]], np.uint8)
  image = outputs.replace_background(fg_bg, mask, new_bg)
  # 0.25 · (200, 100, 0) + 0.75 · (0, 100, 200) = (50, 100, 150); mask 1: the composite;
  # mask 0: the new background; 0.5 · (0, 0, 0) + 0.5 · (100, 200, 250) = (50, 100, 125).
  np.testing.assert_array_equal(image, [[[50, 100, 150], [10, 20, 30]],
                                        [[0, 0, 0], [50, 100, 125]]])


def test_fit_cover_crops_the_middle_of_a_wider_background():
  # 2 × 4 stripes onto a 2 × 2 photo: scale 1, the middle two columns unchanged.
  stripes = np.zeros((2, 4, 3), np.uint8)
  stripes[:, :, 0] = [10, 20, 30, 40]
  fitted = outputs.fit_cover(stripes, 2, 2)
  np.testing.assert_array_equal(fitted[..., 0], [[20, 30], [20, 30]])


def test_fit_cover_scales_a_small_background_up_without_stretching():
  # A 1 × 1 background covers any photo with its one colour.
  fitted = outputs.fit_cover(np.full((1, 1, 3), 77, np.uint8), 3, 5)
  assert fitted.shape == (3, 5, 3)
  np.testing.assert_array_equal(fitted, 77)
  # Rows 0..3 of a 4 × 2 background whose halves differ, onto a 4 × 4 photo: scale 2, so the
  # source's middle column pair spans it; top half stays its colour, bottom half its own.
  halves = np.zeros((4, 2, 3), np.uint8)
  halves[2:] = 200
  fitted = outputs.fit_cover(halves, 4, 4)
  assert fitted.shape == (4, 4, 3)
  assert fitted[0].max() == 0 and fitted[-1].min() == 200


@pytest.mark.parametrize("mask", [np.full((2, 2), 1.5, np.float32),
                                  np.full((2, 2), np.nan, np.float32),
                                  np.ones((2, 3), np.float32),
                                  np.ones((2, 2), np.uint8)])
def test_bad_masks_are_refused(mask):
  fg_bg, _ = _pair()
  with pytest.raises(errors.UserError, match="mask"):
    outputs.cutout_rgba(fg_bg, mask)
