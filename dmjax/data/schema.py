"""What one example is, whichever source it comes from.

Stored examples (the renderer, the seed-layout reader and the TFDS builder all produce these):

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

IMAGE_KEYS = ("bg", "fg_bg")
LABEL_KEYS = ("mask", "depth")
KEYS = IMAGE_KEYS + LABEL_KEYS

DEPTH_MAX_CODE = 65535
SYNTHETIC_MAX_DEPTH_M = 10.0
DEPTH_VALID_MIN = 0.01
