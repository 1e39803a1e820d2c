"""Built-in synthetic scenes: a numpy renderer of (bg, fg_bg, mask, depth) quartets.

A scene is an indoor room seen through one camera model, with an animal-like object standing on
its floor. Everything is drawn with exact labels and no download:

* Rooms are axis-aligned boxes (floor, four walls, ceiling) holding furniture-like boxes, with
  windows, doors, pictures and rugs, procedurally textured and lit by one ceiling lamp. A room
  seed also fixes the camera: a square pinhole image with a FIELD_OF_VIEW_DEG field of view on
  both axes, 1.0-1.8 m above the floor, looking into the room with a random heading and tilted
  5-25 degrees down. One camera model for all images, as in a real dataset from one camera, makes
  absolute depth learnable from a single image.
* Depth is z-depth: the distance along the optical axis (what a depth sensor reports), not the
  Euclidean distance along the pixel's ray. It is ray cast against the geometry at pixel centres
  of fg_bg, so it is exact for the composite, and stored per `dmjax.data.schema` as
  round(clip(z / SYNTHETIC_MAX_DEPTH_M, 0, 1) * 65535).
* The object is a cut-out facing the camera, a smooth union of superellipses with wobbly
  outlines, tapered capsules and triangles (body, head, ears, legs, tail), with a rounded depth
  profile and textured fur. It stands on the floor: a visible floor point and a height in metres
  are drawn and projected, so its size in the image follows its depth. Furniture in front of it
  hides it, in the mask too. It casts a soft shadow from the lamp and a contact shadow; both
  darken fg_bg but are not part of the mask. The mask is the object's alpha (soft edges); the
  depth label takes the object's depth where the mask is at least 128 and the room's elsewhere.
* bg and fg_bg are two shots of the room: independent exposure, white balance, sensor noise,
  blur and JPEG quality, a smooth lighting change on fg_bg, and bg shifted by up to
  MAX_SHIFT_PX_AT_80 pixels (scaled with the resolution) with subpixel precision. Some objects are
  coloured like the background behind them. The labels are exact for fg_bg.

Splits: example i of a split uses room i mod NUM_ROOMS[split]; the test split's rooms come from
seeds that the training split never draws (`room_seed`), so its backgrounds are unseen. Many
composites share a room and its camera, as the seed dataset's composites share 100 background
photos. An example depends only on (split, index, resolution, seed): its random generator is
seeded from them, and rendered rooms are cached per process only as a speed-up.

Modules, in the order a scene is made: `rooms` (camera and room layout), `textures` (value noise,
material albedo), `shading` (ray casting and shading of the empty room), `shapes` (the object's
outline and depth profile), `style` (its coat), `composite` (placing, drawing and photographing
one example), `scene` (the entry points below).
"""

from dmjax.data.synthetic.composite import (
  CLOSEUP_PROBABILITY,
  DEFAULT_REALISM,
  Realism,
  SyntheticScene,
)
from dmjax.data.synthetic.rooms import (
  CAMERA_HEIGHT_RANGE_M,
  CEILING,
  FIELD_OF_VIEW_DEG,
  FIRST_BOX,
  FLOOR,
  MAX_SHIFT_PX_AT_80,
  WALL_X0,
  WALL_X1,
  WALL_Y0,
  WALL_Y1,
  focal_length_px,
  room_layout,
)
from dmjax.data.synthetic.scene import (
  _ROOM_CACHE,  # noqa: F401  (tests clear it to show examples do not depend on the cache)
  NUM_ROOMS,
  SPLITS,
  render_example,
  render_scene,
  room_seed,
)

__all__ = ["CAMERA_HEIGHT_RANGE_M", "CEILING", "CLOSEUP_PROBABILITY", "DEFAULT_REALISM",
           "FIELD_OF_VIEW_DEG", "FIRST_BOX", "FLOOR", "MAX_SHIFT_PX_AT_80", "NUM_ROOMS", "SPLITS",
           "WALL_X0", "WALL_X1", "WALL_Y0", "WALL_Y1", "Realism", "SyntheticScene",
           "focal_length_px", "render_example", "render_scene", "room_layout", "room_seed"]
