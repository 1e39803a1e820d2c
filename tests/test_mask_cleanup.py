"""Holes filled and stray pieces dropped (dmjax.inference.mask_cleanup), on masks drawn by hand."""

import numpy as np

from dmjax.inference import mask_cleanup


def _square_with_hole_and_speck():
  probability = np.full((40, 40), 0.1, np.float32)
  probability[10:30, 10:30] = 0.9  # The object: 400 pixels.
  probability[18:20, 18:20] = 0.2  # A 4-pixel hole, 1 % of it.
  probability[0:3, 35:38] = 0.7  # A 9-pixel speck at the edge, 2 % of the object.
  return probability


def test_small_hole_is_filled_and_speck_dropped_by_mirroring_their_probabilities():
  probability = _square_with_hole_and_speck()
  cleaned = mask_cleanup.clean_mask(probability)
  expected = probability.copy()
  expected[18:20, 18:20] = 0.8
  expected[0:3, 35:38] = 0.3
  np.testing.assert_allclose(cleaned, expected, atol=1e-6)
  assert cleaned.dtype == np.float32


def test_either_step_can_be_turned_off():
  probability = _square_with_hole_and_speck()
  no_fill = mask_cleanup.clean_mask(probability, max_hole=0)
  np.testing.assert_array_equal(no_fill[18:20, 18:20], probability[18:20, 18:20])
  assert (no_fill[0:3, 35:38] < 0.5).all()
  no_drop = mask_cleanup.clean_mask(probability, min_part=0)
  np.testing.assert_array_equal(no_drop[0:3, 35:38], probability[0:3, 35:38])
  assert (no_drop[18:20, 18:20] > 0.5).all()


def test_large_holes_large_pieces_and_gaps_open_to_the_edge_stay():
  probability = np.zeros((50, 50), np.float32)
  probability[5:25, 5:25] = 1.0
  probability[9:21, 9:21] = 0.0  # A ring: its 144-pixel hole is 56 % of its 256 pixels.
  probability[30:50, 30:38] = 1.0  # A second piece, 160 pixels: 62 % of the ring.
  probability[30:50, 33:35] = 0.0  # A slot that reaches the photo's bottom edge: no hole.
  np.testing.assert_array_equal(mask_cleanup.clean_mask(probability), probability)


def test_pixels_touching_at_a_corner_are_one_piece_and_enclose_a_hole():
  # A diamond outline one pixel thick (32 pixels that touch only diagonally) and a 3-pixel speck:
  # under a tenth of the outline only if the outline is one piece.
  probability = np.zeros((21, 24), np.float32)
  for step in range(9):
    for row, col in ((2 + step, 10 + step), (2 + step, 10 - step), (18 - step, 10 + step),
                     (18 - step, 10 - step)):
      probability[row, col] = 1.0
  probability[5, 21:24] = 1.0
  cleaned = mask_cleanup.clean_mask(probability, max_hole=4.0)
  inside = np.zeros_like(probability, bool)
  for row in range(3, 18):
    half = 7 - abs(row - 10)
    inside[row, 10 - half:10 + half + 1] = True
  assert inside.sum() == 113 and (cleaned[inside] > 0.5).all()  # Background: 4-connected.
  assert (cleaned[5, 21:24] < 0.5).all()
  outline = ~inside & (probability > 0.5)
  outline[5, 21:24] = False
  assert outline.sum() == 32 and (cleaned[outline] == 1.0).all()


def test_a_pixel_at_the_threshold_inside_a_hole_becomes_object():
  probability = np.ones((5, 5), np.float32)
  probability[2, 2] = 0.5
  assert mask_cleanup.clean_mask(probability)[2, 2] > 0.5


def test_empty_and_full_masks_are_returned_as_they_are():
  for value in (0.0, 1.0):
    probability = np.full((8, 8), value, np.float32)
    np.testing.assert_array_equal(mask_cleanup.clean_mask(probability), probability)
