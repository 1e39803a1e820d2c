"""What one example is, whichever source it comes from.

Stored examples (the renderer, the original-layout reader and the TFDS builder produce these):

  bg     uint8  (H, W, 3)  the background photo
  fg_bg  uint8  (H, W, 3)  the composite: an object over (a re-shot of) the same background
  mask   uint8  (H, W, 1)  the object's alpha, 0..255 (soft edges allowed)
  depth  uint16 (H, W, 1)  depth of the composite scene, DEPTH_SCALE = 1.0, 0 = NEAREST

Depth convention, for all data: a value in [0, 1] stored as round(d * 65535); 0 is at the
camera, 1 is far. For the synthetic scenes d = metres / SYNTHETIC_MAX_DEPTH_M (clipped), so it
is linear in metric depth and comparable across images. The seed data (SPEC §4) already uses
0 = nearest with a per-image rescale to 0..255, so its reader only divides by 255.

Batches out of the pipeline are float32: `bg`, `fg_bg` normalised with the channel statistics in
`dmjax.config`; `mask` and `depth` in [0, 1] with shape (B, H, W, 1).

Ratio and log depth metrics only use pixels whose true depth is at least DEPTH_VALID_MIN (the
seed's per-image rescale puts its nearest pixel at exactly 0), and clip predictions to
[DEPTH_VALID_MIN, 1] before taking ratios or logs.
"""

import numpy as np
from PIL import Image

IMAGE_KEYS = ("bg", "fg_bg")
LABEL_KEYS = ("mask", "depth")
KEYS = IMAGE_KEYS + LABEL_KEYS

DEPTH_MAX_CODE = 65535
SYNTHETIC_MAX_DEPTH_M = 10.0
DEPTH_VALID_MIN = 0.01
# A mask probability (or alpha in [0, 1]) above this is the object: for the metrics, and for the
# mask clean-up that must agree with them.
MASK_THRESHOLD = 0.5

# Channel statistics of the seed dataset (SPEC §4), RGB in [0, 1]. Every source is normalised
# with them, so a model trained on one transfers to the other without re-normalising.
PHOTO_MEAN = {"bg": (0.690, 0.651, 0.608), "fg_bg": (0.681, 0.641, 0.598)}
PHOTO_STD = {"bg": (0.189, 0.209, 0.235), "fg_bg": (0.194, 0.213, 0.236)}


def photo_normalization(key: str) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) taking a 0..255 photo to the model's input in one multiply-add:
  (v / 255 - mean) / std."""
  mean, std = np.array(PHOTO_MEAN[key], np.float32), np.array(PHOTO_STD[key], np.float32)
  return 1.0 / (255.0 * std), -mean / std


def normalize_photo(image: np.ndarray, key: str) -> np.ndarray:
  """A uint8 photo (..., 3) → the model's float32 input."""
  scale, offset = photo_normalization(key)
  return image.astype(np.float32) * scale + offset


def denormalize_photo(image: np.ndarray, key: str) -> np.ndarray:
  """The model's input back to RGB in [0, 1]."""
  mean, std = np.array(PHOTO_MEAN[key], np.float32), np.array(PHOTO_STD[key], np.float32)
  return np.clip(np.asarray(image) * std + mean, 0.0, 1.0)


def resize_whole_frame(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W, C) → (height, width, C) with PIL's bilinear filter, which widens with the downscale
  factor, so shrinking averages the area instead of aliasing; as is if already that size. The
  one resize between stored examples and what the model sees, in evaluation and in prediction.
  uint8 stays uint8 (rounded as PIL rounds); float32 images (one channel) stay float32."""
  if image.shape[:2] == (height, width):
    return image
  plane = image[..., 0] if image.shape[-1] == 1 else image
  resized = Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR)
  return np.asarray(resized).reshape(height, width, image.shape[-1])
